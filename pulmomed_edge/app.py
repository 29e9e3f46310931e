"""The composition root: `create_app(settings)` wires every long-lived resource once.

The server listens at once; models and the index load in the background (health says
"starting" meanwhile). Each component records its own status and, if it failed, why and how to
fix it. Everything opened here is closed on shutdown, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from .cache import ResponseCache
from .cases import CaseLibrary
from .config import Settings, manifest_path
from .errors import KnowledgeIndexError, ModelError, PulmoMedError
from .schema import TeacherResponse

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "stalled", "failed"]


@dataclass
class Component:
    status: Status = "loading"
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    fix: str | None = None
    # who can act, in Spanish, for the teacher (fix is then the lab admin's command line)
    solucion: str | None = None

    def fail(self, exc: BaseException) -> None:
        self.status = "failed"
        if isinstance(exc, PulmoMedError):
            self.error = f"{exc.mensaje} / {exc.message}"
            self.fix = exc.fix or None
        else:
            self.error = f"{type(exc).__name__}: {exc}"
        self.solucion = ADMIN_FIX if self.fix else ADMIN_LOG

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, **self.detail}
        if self.error:
            out["error"] = self.error
        if self.fix:
            out["fix"] = self.fix
        if self.solucion:
            out["solucion"] = self.solucion
        return out


# what the teacher reads beside a fault they cannot fix from the page
ADMIN_FIX = "Avise a quien administra este portátil: la orden que lo arregla es la de abajo."
ADMIN_LOG = "Avise a quien administra este portátil: los detalles están en el registro del servidor."


@dataclass
class ServerState:
    """Everything the handlers may use; filled in by the background loader."""

    settings: Settings
    library: CaseLibrary
    cache: ResponseCache[TeacherResponse]
    started: float = field(default_factory=time.monotonic)
    components: dict[str, Component] = field(
        default_factory=lambda: {n: Component() for n in ("embeddings", "index", "llm")}
    )
    rate_limiter: Any = None
    retriever: Any = None
    teacher: Any = None
    engine: Any = None
    closers: list[Any] = field(default_factory=list)
    loader: asyncio.Task[None] | None = None

    def check_engine(self) -> None:
        """Bring the LLM component up to date with its engine: failed once the worker has died,
        "stalled" while one pass of it has run far too long (students get the summary at once
        meanwhile), ready again when it moves on."""
        llm, engine = self.components["llm"], self.engine
        if engine is None or llm.status not in ("ready", "stalled"):
            return
        if engine.failure:
            llm.status = "failed"
            llm.error = (
                f"El motor de generación se detuvo ({engine.failure}): los alumnos reciben el resumen "
                f"de las fuentes. / The generation engine stopped: {engine.failure}"
            )
            # the teacher can do this one
            llm.solucion = "Reinicia PulmoMed Edge (ciérralo y vuelve a abrirlo)."
            llm.fix = (
                f"restart PulmoMed Edge (close it and start it again); details in {self.settings.log_file}"
            )
            return
        stalled = engine.stalled_s()
        if stalled:
            llm.status = "stalled"
            llm.error = (
                f"El motor de generación lleva {stalled:.0f} s sin terminar un paso: los alumnos "
                f"reciben el resumen de las fuentes. / The generation engine has been stuck for "
                f"{stalled:.0f} s."
            )
            llm.solucion = "Espera un minuto; si sigue atascado, reinicia PulmoMed Edge."
            llm.fix = (
                "wait a minute; if it stays stalled, restart PulmoMed Edge "
                f"(details in {self.settings.log_file})"
            )
        elif llm.status == "stalled":
            llm.status, llm.error, llm.fix, llm.solucion = "ready", None, None, None

    @property
    def status(self) -> str:
        self.check_engine()
        states = {c.status for c in self.components.values()}
        if "loading" in states:
            return "starting"
        return "healthy" if states == {"ready"} else "degraded"


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)


def create_app(settings: Settings) -> web.Application:
    from .http.middlewares import RateLimiter, error_middleware
    from .http.routes import add_routes

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[STATE] = ServerState(
        settings=settings,
        library=CaseLibrary.load(),
        cache=ResponseCache(settings.cache_size, settings.cache_ttl_s),
    )
    app[STATE].rate_limiter = RateLimiter(settings.rate_limit_per_min, time.monotonic)
    app.cleanup_ctx.append(_resources)
    add_routes(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.loader = asyncio.create_task(load_components(state))
    yield
    state.loader.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await state.loader
    if state.teacher is not None:
        await state.teacher.close()
    for close in reversed(state.closers):
        try:
            await asyncio.to_thread(close)
        except Exception:
            log.exception("closing a resource failed")


async def load_components(state: ServerState) -> None:
    """Load embeddings → index → LLM; each failure is recorded, never raised."""
    from .model_store import ModelStore
    from .retrieval import open_encoder, open_retriever

    settings = state.settings
    try:
        store = ModelStore(settings.models_dir, manifest_path())
    except Exception as exc:  # no manifest (a bundle built without it): nothing can load
        log.error("model store failed: %s", exc)
        for component in state.components.values():
            component.fail(exc)
        return
    retriever = None
    index_id = ""
    try:
        encoder, encoder_sha = await asyncio.to_thread(open_encoder, store, test=settings.test_models)
        state.closers.append(encoder.close)
        state.components["embeddings"].status = "ready"
        state.components["embeddings"].detail = {
            "model": "all-MiniLM-L6-v2 int8",
            "sha256": encoder_sha,
            "dim": encoder.dim,
        }
    except Exception as exc:
        log.error("embeddings failed: %s", exc)
        state.components["embeddings"].fail(exc)
        state.components["index"].fail(
            KnowledgeIndexError(
                "El índice necesita el modelo de embeddings, que no se pudo cargar.",
                "The index needs the embedding model, which failed to load.",
                "fix the embeddings component first (see its fix), then restart",
            )
        )
    else:
        try:
            retriever = await asyncio.to_thread(open_retriever, settings.index_dir, encoder, encoder_sha)
            index = retriever.index
            state.closers.append(index.close)
            state.retriever = retriever
            index_id = index.index_id
            state.components["index"].status = "ready"
            state.components["index"].detail = {"passages": len(index), "index_id": index_id}
        except Exception as exc:
            log.error("index failed: %s", exc)
            state.components["index"].fail(exc)
    llm = None
    try:
        llm = await asyncio.to_thread(_open_llm, store, settings, state)
    except Exception as exc:
        log.error("LLM failed: %s", exc)
        state.components["llm"].fail(exc)
    if retriever is not None:
        from .teacher import TeacherConfig, TeacherService

        state.teacher = TeacherService(
            library=state.library,
            search=retriever.search,
            index_id=index_id,
            cache=state.cache,
            config=TeacherConfig(
                budget_s=settings.budget_s,
                max_new_tokens=settings.max_new_tokens,
                top_k_passages=settings.top_k_passages,
                max_prompt_tokens=settings.max_prompt_tokens,
                backfill=settings.backfill,
                grounding=settings.grounding_on(model_added=llm is not None and llm.added),
                recommendation_from_sources=settings.recommendation_from_sources(
                    model_added=llm is not None and llm.added
                ),
                stream_sentences=settings.stream_sentences,
            ),
            llm=llm,
        )
    if llm is not None:
        # "ready" only once the engine runs: health must not say healthy while a question would
        # still find no engine (the warm-up below yields to the event loop)
        try:
            if state.teacher is not None:
                prefix = await asyncio.to_thread(state.teacher.warm_prefix)
                llm.engine.start(warm_prefix=prefix)
                state.teacher.start_backfill()
            else:
                llm.engine.start()
            state.components["llm"].status = "ready"
        except Exception as exc:
            log.error("LLM failed to start: %s", exc)
            state.components["llm"].fail(exc)
    log.info("PulmoMed Edge: %s", state.status)


def _open_llm(store: Any, settings: Settings, state: ServerState) -> Any:
    from .engine import GenerationEngine
    from .engine.chat import ChatTemplate
    from .engine.runtime import ContextFailed, LlamaRuntime, ModelLoadFailed, RuntimeConfig
    from .teacher import LanguageModel

    name = settings.model or store.default_name("llm", test=settings.test_models)
    component = state.components["llm"]
    entry = store.entry(name, role="llm")
    component.detail = {"model": name, "sha256": entry.sha256, "loaded": False}
    if entry.role != "llm":
        llms = ", ".join(store.names("llm"))
        raise ModelError(
            f"«{name}» no es un modelo de lenguaje (su rol es «{entry.role}»).",
            f"{name!r} is not a language model (its role is {entry.role!r}).",
            f"start with --model set to one of: {llms} (or PULMOMED_MODEL)",
        )
    path = store.verify(name)
    try:
        runtime = LlamaRuntime(
            RuntimeConfig(
                model_path=path,
                n_ctx=settings.effective_n_ctx,
                n_seq=settings.slots + settings.parked_prefixes,
                n_threads=settings.effective_threads,
                unified=settings.kv_layout == "unified",
            )
        )
    except ModelLoadFailed:
        again = (
            f"copy the file again and register it with {store.add_command(path, name)}"
            if entry.is_local
            else f"run `pulmomed-edge models verify --full {name}`"
        )
        raise ModelError(
            f"llama.cpp no pudo cargar el modelo «{name}» ({path}): el archivo puede estar "
            "incompleto o no ser un modelo GGUF que llama.cpp admita.",
            f"llama.cpp could not load model {name!r} ({path}): the file may be incomplete or not "
            "a GGUF model llama.cpp supports.",
            f"{again}; or start with another --model",
        ) from None
    except ContextFailed as exc:
        raise ModelError(
            f"No hay memoria para el contexto del modelo «{name}» ({settings.effective_n_ctx} tokens).",
            f"{exc}.",
            "lower PULMOMED_SLOTS or PULMOMED_PARKED_PREFIXES (or PULMOMED_MAX_PROMPT_TOKENS), "
            "or close other programs",
        ) from None
    engine = GenerationEngine(
        runtime,
        slots=settings.slots,
        parked=settings.parked_prefixes,
        queue_size=settings.queue_size,
        prefill_chunk=settings.prefill_chunk,
        max_context_per_slot=settings.context_per_answer,
    )
    state.engine = engine

    def free_runtime() -> None:
        # a worker stuck inside llama_decode past stop()'s wait would use freed memory: leave
        # the model to the process's exit instead
        if engine.worker_alive:
            log.warning("the engine worker did not stop; the model is freed when the process exits")
            return
        runtime.close()

    state.closers.append(free_runtime)
    state.closers.append(engine.stop)  # closed first (reverse order): stop the worker, then free
    component.detail.update(
        {"loaded": True, "slots": settings.slots, "n_ctx": runtime.n_ctx, "kv_layout": settings.kv_layout}
    )
    return LanguageModel(
        name=name,
        sha256=entry.sha256,
        engine=engine,
        template=ChatTemplate.from_runtime(runtime),
        tokenize=runtime.tokenize,
        added=entry.is_local,
    )
