"""Handlers: parse the request, call the library, render JSON. No model work happens here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import HttpVersion11, web

from .. import __version__
from ..app import STATE, ServerState
from ..schema import InvalidRequest, SimulationState, parse_state
from .middlewares import MESSAGES, dumps, json_error
from .status_page import render_status_page

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
BODY_READ_S = 15.0  # a headset sends its few hundred bytes at once
HEARTBEAT_S = 5.0  # a comment line on a stream while the answer has nothing new


def _json_int(digits: str) -> int | float:
    # over Python's 4300-digit limit int() raises, and the body would be called "not JSON"
    return int(digits) if len(digits) <= 1000 else float(digits)


def add_routes(app: web.Application) -> None:
    expect = {"expect_handler": _expect}
    app.router.add_post("/api/v1/consultar_profesor", consultar_profesor, **expect)
    app.router.add_post("/api/v1/consultar_profesor/stream", consultar_profesor_stream, **expect)
    for base in ("/api/v1/library_cases", "/api/v1/casos_biblioteca"):
        app.router.add_get(base, library_cases, **expect)
        app.router.add_get(base + "/{caso_id}", library_case, **expect)
    app.router.add_get("/api/v1/health", health, **expect)
    app.router.add_get("/api/v1/search", search, **expect)
    app.router.add_get("/", status_page, **expect)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """An `Expect` header, answered before any middleware runs (aiohttp's default answers in
    plain English text and says "100 Continue" to a body it will refuse as too large)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return json_error(417, "Cabecera Expect no admitida: usa «100-continue» o ninguna.")
    if (request.content_length or 0) > request.app[STATE].settings.max_body_bytes:
        return json_error(413, MESSAGES[413])
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started
    return None


# --- the teacher ---------------------------------------------------------------------------
def _refusal(state: ServerState, request: web.Request) -> web.Response | None:
    """503 while starting or without a knowledge index, else 429 over the headset's rate. The 503
    comes first and is not counted: a headset told to retry in 5 s while the models load used up
    its questions doing so, and was locked out just as the teacher became ready."""
    if unavailable := _unavailable(state, "El profesor virtual"):
        return unavailable
    wait = state.rate_limiter.check(request.remote or "?")
    if wait > 0:
        return json_error(
            429,
            "Has hecho demasiadas preguntas seguidas. Espera un momento antes de volver a preguntar.",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    return None


def _unavailable(state: ServerState, what: str) -> web.Response | None:
    """503 while starting (retry soon), or with a part broken for good (its fault and fix)."""
    if state.status == "starting":
        return json_error(
            503,
            f"{what} se está iniciando (cargando modelos). Inténtalo en unos segundos.",
            headers={"Retry-After": RETRY_AFTER_S},
            estado="starting",
        )
    if state.teacher is None:
        broken = {n: c.as_json() for n, c in state.components.items() if c.status == "failed"}
        return json_error(
            503,
            f"{what} no está disponible: falta un componente. Avisa al docente.",
            headers={"Retry-After": "30"},
            estado=state.status,
            componentes=broken,
        )
    return None


def _bad_body(message: str, kind: type[web.HTTPException] = web.HTTPBadRequest) -> web.HTTPException:
    """A refusal of the request body, in JSON (the error middleware passes it through as is)."""
    return kind(text=dumps({"error": message}), content_type="application/json")


async def _read_state(request: web.Request, state: ServerState) -> SimulationState:
    try:
        # over client_max_size → 413 (middleware renders it); a sender that stalls mid-body
        # must not hold the connection for ever
        async with asyncio.timeout(BODY_READ_S):
            body = await request.read()
    except TimeoutError:
        incomplete = "El cuerpo de la solicitud llegó incompleto: vuelve a enviarlo."
        raise _bad_body(incomplete, web.HTTPRequestTimeout) from None
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not match
        # the headset's mistake, not ours: one line in the teacher's log (MalformedHttpFilter
        # drops aiohttp's own report of it, a traceback)
        log.warning("unreadable request body from %s: %s", request.remote, " ".join(str(exc).split()))
        raise _bad_body("No se pudo leer el cuerpo de la solicitud (¿compresión errónea?).") from None
    try:
        # a leading BOM is allowed (RFC 8259: a reader may ignore it; Windows tools write one)
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad_body("El cuerpo de la solicitud debe estar codificado en UTF-8.") from None
    try:
        # NaN/Infinity are not JSON: keep them as floats so validation names the field; so are
        # integers too long for Python to convert (no field's range is anywhere near them)
        data = json.loads(text, parse_constant=float, parse_int=_json_int)
    except ValueError:
        raise _bad_body("El cuerpo de la solicitud no es JSON válido.") from None
    except RecursionError:
        # arrays or objects nested thousands deep (the decoder recurses): no state is like that
        raise _bad_body("El cuerpo de la solicitud anida demasiadas listas u objetos.") from None
    if not isinstance(data, dict):
        raise _bad_body("El cuerpo debe ser un objeto JSON con el estado de la simulación.")
    return parse_state(data, state.library.ids)


async def _accept(request: web.Request) -> SimulationState | web.Response:
    """The validated state of a teacher request, or the response that refuses it."""
    state = request.app[STATE]
    if (refusal := _refusal(state, request)) is not None:
        return refusal
    try:
        return await _read_state(request, state)
    except InvalidRequest as exc:
        return web.json_response(exc.body(), status=422, dumps=dumps)


async def consultar_profesor(request: web.Request) -> web.Response:
    sim = await _accept(request)
    if isinstance(sim, web.Response):
        return sim
    state = request.app[STATE]
    answer = await state.teacher.answer(sim)
    return web.json_response(answer.model_dump(), dumps=dumps)


async def consultar_profesor_stream(request: web.Request) -> web.StreamResponse:
    sim = await _accept(request)
    if isinstance(sim, web.Response):
        return sim
    state = request.app[STATE]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    events = state.teacher.stream(sim).__aiter__()
    next_event: asyncio.Task[Any] | None = None
    try:
        while True:
            next_event = asyncio.ensure_future(events.__anext__())
            while True:
                done, _ = await asyncio.wait({next_event}, timeout=HEARTBEAT_S)
                if done:
                    break
                await response.write(b": esperando\n\n")  # heartbeat while queued or thinking
            try:
                kind, data = next_event.result()
            except StopAsyncIteration:
                break
            payload = data.model_dump() if kind == "done" else data
            await response.write(_sse(kind, payload))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("stream failed")
        await response.write(_sse("error", {"error": "Error interno durante la respuesta."}))
    finally:
        if next_event is not None and not next_event.done():
            next_event.cancel()
            # the generator runs until the cancellation reaches it; closing it before that
            # raised "aclose(): asynchronous generator is already running"
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await next_event
        await events.aclose()
    await response.write_eof()
    return response


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


# --- the case library ----------------------------------------------------------------------
async def library_cases(request: web.Request) -> web.Response:
    cases = [c.to_json() for c in request.app[STATE].library.all()]
    return web.json_response({"count": len(cases), "cases": cases}, dumps=dumps)


async def library_case(request: web.Request) -> web.Response:
    caso_id = request.match_info["caso_id"]
    case = request.app[STATE].library.get(caso_id)
    if case is None:
        return json_error(404, f"No existe el caso «{caso_id}» en la biblioteca.", found=False)
    return web.json_response({"found": True, "case": case.to_json()}, dumps=dumps)


# --- health and search -----------------------------------------------------------------------
def health_body(state: ServerState) -> dict[str, Any]:
    status = state.status  # first: it brings the LLM component up to date with its engine
    components = {name: c.as_json() for name, c in state.components.items()}
    components["cache"] = {"status": "ready", **state.cache.stats()}
    if state.engine is not None:
        components["llm"]["engine"] = state.engine.stats()
        components["llm"]["batch_plan"] = state.engine.plan.as_dict()
        components["llm"]["step_s_by_rows"] = state.engine.step_cost.as_dict()
    body: dict[str, Any] = {
        "status": status,
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 1),
        "components": components,
    }
    if state.teacher is not None:
        teacher = state.teacher
        body["activity"] = {
            **teacher.recent.summary(),
            "backfill": teacher.backfill_stats(),
            "timeouts": dict(teacher.timeouts),
            "busy": dict(teacher.busy),
            "grounding": {"enabled": teacher.config.grounding, **teacher.grounding},
            # who writes the recommendation (Settings.recommendation)
            "recomendacion": "fuentes" if teacher.config.recommendation_from_sources else "modelo",
        }
    return body


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = health_body(state)
    return web.json_response(body, status=200 if body["status"] == "healthy" else 503, dumps=dumps)


async def search(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    q = request.query.get("q", "").strip()
    if not q:
        problems.append({"campo": "q", "mensaje": "Este parámetro es obligatorio."})
    elif len(q) > 500:
        problems.append({"campo": "q", "mensaje": "Máximo 500 caracteres."})
    k_raw = request.query.get("k", "5")
    try:
        k = int(k_raw)
        if not 1 <= k <= 20:
            raise ValueError
    except ValueError:
        problems.append({"campo": "k", "mensaje": "Debe ser un número entero entre 1 y 20."})
    if problems:
        return web.json_response(
            {"error": "Parámetros de búsqueda no válidos.", "detalles": problems}, status=422, dumps=dumps
        )
    if state.retriever is None:  # loading, or the index is broken: which, and the way out
        return _unavailable(state, "La búsqueda") or json_error(
            503, "La búsqueda aún no está disponible.", headers={"Retry-After": RETRY_AFTER_S}
        )
    hits = await asyncio.to_thread(state.retriever.search, q, k)
    results = [
        {
            "id": h.passage.id,
            "titulo": h.passage.titulo,
            "fuente": h.passage.fuente,
            "texto": h.passage.texto,
            "score": round(float(h.score), 6),
            "grounded": h.grounded,
        }
        for h in hits
    ]
    return web.json_response({"query": q, "results": results}, dumps=dumps)


async def status_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # the port this request came in on: the one headsets use (the setting may be 0, "any free")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else state.settings.port
    html = render_status_page(health_body(state), state.settings.host, port)
    return web.Response(text=html, content_type="text/html", charset="utf-8")
