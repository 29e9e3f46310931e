"""The two references `bench` compares against, on the same GGUF and machine.

- baseline: llama-cpp-python's OpenAI-compatible server (interrupt_requests off), sent the very
  prompts our teacher renders for the same states, with the same number of new tokens.
- ceiling: raw batched llama_decode of N sequences at once, no HTTP, no sampling logic.
- invariance: our engine's greedy answers to the same prompts, all at once and then each alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from .config import Settings, manifest_path


def _model_path(args: argparse.Namespace) -> tuple[str, Any]:
    from .model_store import ModelStore

    settings = Settings.from_env()
    store = ModelStore(settings.models_dir, manifest_path())
    name = args.model or store.default_name("llm", test=args.test_models)
    return name, store.verify(name)


def render_prompts(args: argparse.Namespace, plans: list[list[dict]]) -> list[list[str]]:
    """The exact prompt text our teacher would send to the model for each planned state."""
    from .cases import CaseLibrary
    from .engine.chat import ChatTemplate
    from .engine.runtime import LlamaRuntime, RuntimeConfig
    from .model_store import ModelStore
    from .prompts import render_prompt
    from .retrieval import open_encoder, open_retriever
    from .schema import parse_state
    from .teacher import TeacherConfig, TeacherService

    settings = Settings.from_env()
    store = ModelStore(settings.models_dir, manifest_path())
    encoder, sha = open_encoder(store, test=args.test_models or settings.test_models)
    retriever = open_retriever(settings.index_dir, encoder, sha)
    index = retriever.index
    _, path = _model_path(args)
    rt = LlamaRuntime(RuntimeConfig(model_path=path, n_ctx=256, n_seq=1, n_threads=1))
    template = ChatTemplate.from_runtime(rt)
    library = CaseLibrary.load()
    teacher = TeacherService(
        library=library,
        search=retriever.search,
        index_id=index.index_id,
        cache=None,  # type: ignore[arg-type]
        config=TeacherConfig(),
    )
    out: list[list[str]] = []
    try:
        for plan in plans:
            texts = []
            for body in plan:
                state = parse_state(body, library.ids)
                prepared = teacher.prepare(state)
                texts.append(render_prompt(template, prepared.state, prepared.case, prepared.passages))
            out.append(texts)
    finally:
        rt.close()
        index.close()
        encoder.close()
    return out


async def _complete(
    session: Any, base: str, prompt: str, max_tokens: int
) -> tuple[float | None, float, int, str]:
    started = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.3, "stream": True}
    try:
        async with session.post(base + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return None, time.perf_counter() - started, 0, f"HTTP {resp.status}"
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    except Exception as exc:
        return ttft, time.perf_counter() - started, tokens, f"{type(exc).__name__}: {exc}"
    return ttft, time.perf_counter() - started, tokens, ""


# llama-cpp-python's Llama takes its model parameters from this function at load time
NO_REPACK = """
import llama_cpp.llama_cpp as lib

_default_params = lib.llama_model_default_params

def _without_repack():
    params = _default_params()
    params.use_extra_bufts = False
    return params

lib.llama_model_default_params = _without_repack
"""
_NO_REPACK_SERVER = NO_REPACK + "from llama_cpp.server.__main__ import main\nmain()\n"


async def run_baseline(args: argparse.Namespace, plans: list[list[dict]]) -> dict[str, Any]:
    import random

    import aiohttp

    from .bench import _pct
    from .bench_server import RssSampler, ServerProcess, free_port

    prompts = await asyncio.to_thread(render_prompts, args, plans)
    _, path = _model_path(args)
    port = free_port()
    n_ctx = max(2048, args.max_tokens + 1024)
    # llama.cpp repacks CPU weights by default and llama_cpp.server has no option against it; our
    # engine does not repack (slower on this machine's Q4_K_M), so --baseline-no-repack asks the
    # baseline to load its weights the same way, for a like-for-like comparison
    launch = (
        ["-c", _NO_REPACK_SERVER]
        if getattr(args, "baseline_no_repack", False)
        else ["-m", "llama_cpp.server"]
    )
    cmd = [
        sys.executable,
        *launch,
        "--model",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--interrupt_requests",
        "False",
        "--n_threads",
        str(Settings.from_env().effective_threads),
    ]
    server = ServerProcess(f"llama_cpp.server at http://127.0.0.1:{port}", cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            while True:
                if server.exited:
                    what = f"llama_cpp.server exited with code {server.returncode}"
                    return {"error": server.failure(f"{what} (is llama-cpp-python[server] installed?)")}
                try:
                    async with s.get(base + "/v1/models") as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    return {"error": server.failure("llama_cpp.server did not start within 120 s")}
                await asyncio.sleep(0.5)
        sampler = RssSampler(server.pid)
        sampler.start()
        started = time.perf_counter()

        async def headset(i: int) -> list[tuple[float | None, float, int, str]]:
            rng = random.Random(args.seed * 1000 + i)
            timeout = aiohttp.ClientTimeout(total=900)
            results = []
            async with aiohttp.ClientSession(timeout=timeout) as s:
                for prompt in prompts[i]:
                    if args.think > 0:
                        await asyncio.sleep(rng.expovariate(1.0 / args.think))
                    results.append(await _complete(s, base, prompt, args.max_tokens))
            return results

        runs = [r for rs in await asyncio.gather(*(headset(i) for i in range(len(prompts)))) for r in rs]
        wall = time.perf_counter() - started
        rss_mb = await sampler.stop()
    finally:
        server.stop()
    ok = [r for r in runs if not r[3]]
    tokens = sum(r[2] for r in runs)
    return {
        "requests": len(runs),
        "ok": len(ok),
        "errors": len(runs) - len(ok),
        "cut_answers": sum(1 for r in ok if r[2] >= args.max_tokens),
        "new_tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 2) if wall else None,
        "ttft_s": {
            q: _pct([r[0] for r in ok if r[0] is not None], n)
            for q, n in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "e2e_s": {q: _pct([r[1] for r in ok], n) for q, n in (("p50", 50), ("p95", 95), ("p99", 99))},
        "server_rss_mb": rss_mb,
    }


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """Raw batched decode: N sequences, one token each per llama_decode, greedy, no grammar."""
    from .engine.runtime import LlamaRuntime, RuntimeConfig

    n = args.headsets
    steps = args.max_tokens
    _, path = _model_path(args)
    prompt_len = 32
    rt = LlamaRuntime(
        RuntimeConfig(
            model_path=path,
            n_ctx=n * (prompt_len + steps + 8),
            n_seq=n,
            n_threads=Settings.from_env().effective_threads,
            n_batch=max(512, n * prompt_len),
        )
    )
    try:
        prompt = rt.tokenize("El cáncer de pulmón no microcítico es")[:prompt_len]
        entries = [(t, p, s, p == len(prompt) - 1) for s in range(n) for p, t in enumerate(prompt)]
        if rt.decode(entries) != 0:
            return {"error": "prefill failed"}
        last = [rt.logits(i) for i in range(len(entries)) if entries[i][3]]
        tokens = [int(np.argmax(lg)) for lg in last]
        pos = len(prompt)
        started = time.perf_counter()
        for _ in range(steps):
            if rt.decode([(tokens[s], pos, s, True) for s in range(n)]) != 0:
                return {"error": "decode failed"}
            tokens = [int(np.argmax(rt.logits(s))) for s in range(n)]
            pos += 1
        elapsed = time.perf_counter() - started
    finally:
        rt.close()
    return {
        "sequences": n,
        "steps": steps,
        "tok_per_s": round(n * steps / elapsed, 2),
        "seconds": round(elapsed, 2),
    }


def run_invariance(args: argparse.Namespace) -> dict[str, Any]:
    """How many greedy answers come out identical alone and in a batch, with real teacher prompts
    (one per headset), our engine as the server runs it (`--slots` slots, its parked prompts) and
    `--max-tokens` new tokens.

    The two runs use two fresh engines, so nothing computed in the batch is reused alone."""
    from .bench import plan_requests

    settings = Settings.from_env()
    texts = [t[0] for t in render_prompts(args, plan_requests(args.headsets, 1, args.mix, args.seed, False))]
    _, path = _model_path(args)
    together = _greedy_answers(path, settings, args, [texts])[0]
    alone = [
        answer for batch in _greedy_answers(path, settings, args, [[t] for t in texts]) for answer in batch
    ]
    same = [a == b for a, b in zip(alone, together, strict=True)]
    return {
        "prompts": len(texts),
        "identical": sum(same),
        "slots": args.slots,
        "new_tokens": args.max_tokens,
        "prefill_chunk": settings.prefill_chunk,
        "differ": [
            {"alone": a, "batched": b} for a, b, ok in zip(alone, together, same, strict=True) if not ok
        ],
    }


def _greedy_answers(
    path: Any, settings: Settings, args: argparse.Namespace, batches: list[list[str]]
) -> list[list[str]]:
    """Each batch of prompt texts submitted at once to one fresh engine, batch after batch."""
    import functools
    import threading

    from .engine import DoneEvent, ErrorEvent, GenerationEngine, GenerationTask, SamplingParams
    from .engine.chat import ChatTemplate
    from .engine.runtime import LlamaRuntime, RuntimeConfig
    from .teacher import system_prefix

    parked = settings.parked_prefixes  # as the server runs it
    rt = LlamaRuntime(
        RuntimeConfig(
            model_path=path,
            n_ctx=(args.slots + parked) * (settings.max_prompt_tokens + args.max_tokens),
            n_seq=args.slots + parked,
            n_threads=settings.effective_threads,
        )
    )
    engine = GenerationEngine(
        rt,
        slots=args.slots,
        parked=parked,
        queue_size=max(32, max(len(b) for b in batches)),
        prefill_chunk=settings.prefill_chunk,
    )

    def run(batch: list[str]) -> list[str]:
        out: dict[int, str] = {}
        done = threading.Event()

        def record(i: int, event: object) -> None:
            if isinstance(event, DoneEvent | ErrorEvent):
                out[i] = event.text if isinstance(event, DoneEvent) else f"<error: {event.message}>"
                if len(out) == len(batch):
                    done.set()

        for i, text in enumerate(batch):
            task = GenerationTask(
                prompt=rt.tokenize(text),
                sink=functools.partial(record, i),
                max_new_tokens=args.max_tokens,
                params=SamplingParams(temperature=0.0),
            )
            engine.submit(task)
        if not done.wait(1800):
            raise RuntimeError("the engine did not answer within 30 minutes")
        return [out[i] for i in range(len(batch))]

    try:
        engine.start(warm_prefix=system_prefix(ChatTemplate.from_runtime(rt), rt.tokenize))
        results = [run(batch) for batch in batches]
    finally:
        engine.stop()
        rt.close()
    return results
