"""`pulmomed-edge bench`: the classroom load simulator, shipped to users.

Simulated headsets ask a running server over real HTTP (loopback only), each from its own
loopback source address so the per-headset rate limit treats them as separate devices. It prints
a table and writes JSON: time to first token and end to end (p50/p95/p99), aggregate tok/s,
answers by llm_model, errors, cut answers, cache hits, generations and server RSS. `--baseline`
runs llama-cpp-python's own server on the same GGUF with the same rendered prompts; `--ceiling`
measures raw batched decode at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .activity import UNSUPPORTED
from .bench_args import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SLOTS,
    BenchUsageError,
    check_args,
    parse_mix,
)
from .bench_server import (
    NotPulmoMedServer,
    RssSampler,
    free_port,
    get_health,
    spawn_server,
    wait_healthy,
)
from .config import Settings

API = "/api/v1/consultar_profesor"
# the student-style questions the retrieval speed is measured on (shipped with the package)
EVAL_QUERIES = Path(__file__).resolve().parent / "knowledge" / "eval_queries.jsonl"
SENTENCE_END = (".", "!", "?", ".)", ".]")
TRAILING_CITATION = re.compile(r"\s*\[\d+\]$")


def add_bench_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="simulate a classroom of headsets against a server")
    b.add_argument(
        "--url", default="", help="a running server on loopback, http://HOST:PORT (default: spawn one)"
    )
    b.add_argument("--spawn", action="store_true", help="start our own server for the run (the default)")
    b.add_argument("--model", default="", help="model store name for --spawn/--baseline/--ceiling")
    b.add_argument("--test-models", action="store_true", help="use the small test models")
    b.add_argument(
        "--slots", type=int, default=None, help=f"spawned server's slots (default {DEFAULT_SLOTS})"
    )
    b.add_argument("--headsets", type=int, default=16)
    b.add_argument("--requests", type=int, default=2, help="requests per headset")
    b.add_argument(
        "--think", type=float, default=0.0, help="mean think time (s), exponential; 0 = all at once"
    )
    b.add_argument("--mix", default="libre:0.7,biblioteca:0.3")
    b.add_argument("--stream", action="store_true", help="use the streaming endpoint (true TTFT)")
    b.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"new tokens per answer (default {DEFAULT_MAX_TOKENS}): the spawned server's, the baseline's "
        "and the ceiling's",
    )
    b.add_argument("--budget", type=float, default=None, help="spawned server's budget (s); 0 = default")
    b.add_argument("--duration", type=float, default=0.0, help="seconds; headsets keep asking until then")
    b.add_argument(
        "--repeat-after",
        type=float,
        default=0.0,
        help="then pause this long and ask the same questions again (a class that discusses, then "
        "asks again); reported apart; not with --duration",
    )
    b.add_argument("--identical", action="store_true", help="every headset sends the same request")
    b.add_argument("--no-source-ips", action="store_true", help="all headsets from 127.0.0.1")
    b.add_argument("--baseline", action="store_true", help="also run llama_cpp.server on the same prompts")
    b.add_argument(
        "--baseline-no-repack",
        action="store_true",
        help="the baseline loads its weights without llama.cpp's repacking, as our engine does",
    )
    b.add_argument("--ceiling", action="store_true", help="also measure raw batched decode")
    b.add_argument("--retrieval", action="store_true", help="only retrieval speed + index build")
    b.add_argument(
        "--invariance",
        action="store_true",
        help="only: greedy answers to --headsets prompts, batched vs alone, identical or not",
    )
    b.add_argument(
        "--runs",
        type=int,
        default=1,
        help="with --spawn: repeat our run this many times, each on a fresh server (cold cache), and "
        "report the spread (min / median / max); the table shows the first run",
    )
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--json", type=Path, default=None, help="write the results here")
    b.add_argument(
        "--save-answers",
        type=Path,
        default=None,
        help="write every state asked and the answer it got here (JSON lines), for reading them",
    )
    b.set_defaults(func=run)


# --- requests ----------------------------------------------------------------------------------
def plan_requests(headsets: int, per_headset: int, mix: str, seed: int, identical: bool) -> list[list[dict]]:
    """Distinct states (distinct cache keys) per request unless `identical`."""
    from .cases import CaseLibrary

    rng = random.Random(seed)
    weights = parse_mix(mix)
    cases = CaseLibrary.load().all()
    combos = [
        (age, smoke, vol, treat)
        for age in range(25, 100, 10)
        for smoke in ("nunca", "ex", "fumador")
        for vol in (1.5, 8.0, 20.0, 40.0, 90.0)
        for treat in ("ninguno", "quimio", "radio", "inmuno")
    ]
    rng.shuffle(combos)
    plans: list[list[dict]] = []
    n = 0
    for _ in range(headsets):
        plan = []
        for _ in range(per_headset):
            age, smoke, vol, treat = combos[0 if identical else n % len(combos)]
            n += 1
            body: dict[str, Any] = {
                "edad": age,
                "es_fumador": smoke == "fumador",
                "pack_years": 0 if smoke == "nunca" else 35,
                "volumen_tumor_sensible": vol,
                "volumen_tumor_resistente": round(vol * 0.15, 2) if treat != "ninguno" else 0.0,
                "tratamiento_activo": treat,
                "dias_tratamiento": 45 if treat != "ninguno" else 0,
            }
            if not identical and rng.random() < weights.get("biblioteca", 0.0) / sum(weights.values()):
                case = cases[n % len(cases)]
                body.update(
                    edad=case.edad,
                    es_fumador=case.es_fumador,
                    pack_years=case.pack_years,
                    dieta=case.dieta,
                    volumen_tumor_sensible=case.volumen_inicial_sensible,
                    volumen_tumor_resistente=case.volumen_inicial_resistente,
                    modo="biblioteca",
                    caso_id=case.caso_id,
                )
            plan.append(body)
        plans.append(plan)
    return plans


@dataclass
class Outcome:
    headset: int
    status: int
    e2e_s: float
    ttft_s: float | None
    llm_model: str = ""
    cache: str = ""
    cut: bool = False
    error: str = ""
    repeat: bool = False  # asked again after --repeat-after
    state: dict | None = None  # what was asked and what came back (for --save-answers)
    answer: dict | None = None
    streamed: dict | None = None  # the text the headset was streamed, by section
    sent: float = 0.0  # time.perf_counter() when the request left


def is_cut(answer: dict) -> bool:
    """An answer missing a section, or with a section that stops mid-sentence."""
    for key in ("explicacion", "recomendacion"):
        # a citation may follow the full stop ("… de recaída. [1]", as the grounded sections end)
        text = TRAILING_CITATION.sub("", (answer.get(key) or "").strip())
        if not text or not text.endswith(SENTENCE_END):
            return True
    return False


async def _ask(session: Any, base: str, body: dict, stream: bool, headset: int) -> Outcome:
    """One request; its timings all come from the clock read as it leaves (`sent`)."""
    started = time.perf_counter()
    return replace(await _exchange(session, base, body, stream, headset, started), sent=started)


async def _exchange(
    session: Any, base: str, body: dict, stream: bool, headset: int, started: float
) -> Outcome:
    ttft = None
    try:
        if not stream:
            async with session.post(base + API, json=body) as resp:
                data = await resp.json()
                elapsed = time.perf_counter() - started
                if resp.status != 200:
                    return Outcome(headset, resp.status, elapsed, None, error=str(data.get("error", "")))
                return Outcome(
                    headset,
                    200,
                    elapsed,
                    elapsed,
                    data["llm_model"],
                    data.get("cache", ""),
                    is_cut(data),
                    state=body,
                    answer=data,
                )
        async with session.post(base + API + "/stream", json=body) as resp:
            if resp.status != 200:
                data = await resp.json()
                return Outcome(headset, resp.status, time.perf_counter() - started, None, error=str(data))
            final: dict | None = None
            event = ""
            streamed = {"explicacion": "", "recomendacion": ""}
            async for raw in resp.content:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "delta":
                        ttft = ttft or time.perf_counter() - started
                        delta = json.loads(line[6:])
                        streamed[delta["seccion"]] += delta["texto"]
                    elif event == "done":
                        final = json.loads(line[6:])
                    elif event == "error":
                        return Outcome(headset, 200, time.perf_counter() - started, ttft, error=line[6:])
            elapsed = time.perf_counter() - started
            if final is None:
                return Outcome(headset, 200, elapsed, ttft, error="stream ended without done")
            return Outcome(
                headset,
                200,
                elapsed,
                ttft or elapsed,
                final["llm_model"],
                final.get("cache", ""),
                is_cut(final),
                state=body,
                answer=final,
                streamed=streamed if any(streamed.values()) else None,
            )
    except Exception as exc:
        return Outcome(headset, 0, time.perf_counter() - started, None, error=f"{type(exc).__name__}: {exc}")


def source_address(headset: int) -> str:
    """Headset i's own IPv4 loopback address: 127.0.0.2, 127.0.0.3 … one per headset, never .0/.255."""
    n = headset + 1  # n = 0 would be 127.0.0.1, left to everything else
    return f"127.{n // (254 * 256)}.{n // 254 % 256}.{n % 254 + 1}"


def _over_ipv6(base: str) -> bool:
    """IPv6 loopback has the one address ::1, so over it every headset shares its source address."""
    return ":" in (urlparse(base).hostname or "")


def _refused(outcome: Outcome) -> bool:
    """Nothing answered at the server's address any more (it stopped)."""
    return outcome.status == 0 and outcome.error.startswith("ClientConnectorError")


async def _headset(
    i: int, base: str, plan: list[dict], args: argparse.Namespace, t_end: float
) -> list[Outcome]:
    import aiohttp

    local = None if args.no_source_ips or _over_ipv6(base) else (source_address(i), 0)
    connector = aiohttp.TCPConnector(local_addr=local, force_close=False)
    rng = random.Random(args.seed * 1000 + i)
    out: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        k = 0
        while True:
            if args.think > 0:
                pause = rng.expovariate(1.0 / args.think)
                if args.duration:  # never think past the end of the run
                    pause = min(pause, max(0.0, t_end - time.perf_counter()))
                await asyncio.sleep(pause)
            if args.duration and time.perf_counter() >= t_end:
                break
            out.append(await _ask(session, base, plan[k % len(plan)], args.stream, i))
            k += 1
            if _refused(out[-1]):
                return out  # the server stopped: one error says so, not one per planned request
            if not args.duration and k >= len(plan):
                break
        if args.repeat_after > 0 and not args.duration:
            await asyncio.sleep(args.repeat_after)
            for body in plan:
                outcome = await _ask(session, base, body, args.stream, i)
                out.append(replace(outcome, repeat=True))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)


CONTENT_FALLBACKS = (UNSUPPORTED, "fallback-no-grounding")


def summarize(
    outcomes: list[Outcome], wall_s: float, new_tokens: int | None, generations: int | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    e2e = [o.e2e_s for o in ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    hits = [o.e2e_s for o in ok if o.cache == "hit"]
    by_model: dict[str, int] = {}
    for o in ok:
        by_model[o.llm_model] = by_model.get(o.llm_model, 0) + 1
    fallbacks = sum(v for k, v in by_model.items() if k.startswith("fallback-"))
    # of them, the ones the content decided (the grounding check withheld every sentence the model
    # wrote, or no passage covers the state), not the load: a class target on fallbacks reads both
    content = sum(v for k, v in by_model.items() if k in CONTENT_FALLBACKS)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "error_samples": sorted({o.error or str(o.status) for o in outcomes if o not in ok})[:5],
        "cut_answers": sum(o.cut for o in ok if not o.llm_model.startswith("fallback-")),
        # model answers from which the grounding check withheld sentences (cache hits included)
        "trimmed_answers": sum(bool(o.answer and o.answer.get("frases_retiradas")) for o in ok),
        "by_llm_model": by_model,
        "fallback_rate": round(fallbacks / len(ok), 4) if ok else None,
        "content_fallback_rate": round(content / len(ok), 4) if ok else None,
        "cache_hits": sum(o.cache == "hit" for o in ok),
        "shared": sum(o.cache == "shared" for o in ok),
        "generations": generations,
        "new_tokens": new_tokens,
        "wall_s": round(wall_s, 2),
        "tok_per_s": round(new_tokens / wall_s, 2) if wall_s > 0 and new_tokens is not None else None,
        "ttft_s": {"p50": _pct(ttft, 50), "p95": _pct(ttft, 95), "p99": _pct(ttft, 99)},
        "cache_hit_e2e_ms": {
            q: (None if v is None else round(v * 1000, 2))
            for q, v in (("p50", _pct(hits, 50)), ("p99", _pct(hits, 99)))
        },
        "e2e_s": {"p50": _pct(e2e, 50), "p95": _pct(e2e, 95), "p99": _pct(e2e, 99)},
    }


async def run_load(
    base: str, args: argparse.Namespace, server_pid: int | None
) -> tuple[dict[str, Any], list[Outcome]]:
    """The load itself: the summary, and every outcome (for --save-answers)."""
    plans = plan_requests(args.headsets, args.requests, args.mix, args.seed, args.identical)
    _, before = await get_health(base)
    sampler = RssSampler(server_pid)
    sampler.start()
    print(f"bench: {args.headsets} headsets asking {base}", file=sys.stderr, flush=True)
    if _over_ipv6(base) and not args.no_source_ips:
        print("bench: over IPv6 every headset asks from ::1 (one device to a rate limit)", file=sys.stderr)
    started = time.perf_counter()
    t_end = started + args.duration
    results = await asyncio.gather(*(_headset(i, base, plans[i], args, t_end) for i in range(args.headsets)))
    wall = time.perf_counter() - started
    rss_mb = await sampler.stop()
    outcomes = [o for r in results for o in r]
    try:
        _, after = await get_health(base)
    except (OSError, NotPulmoMedServer):
        # what the headsets measured still stands; the server's own counters are unknown
        summary = summarize(outcomes, wall, None, None)
        summary["server_rss_mb"] = rss_mb
        summary["server_stopped"] = f"the server at {base} stopped answering during the run"
        return summary, outcomes
    eng_b = before.get("components", {}).get("llm", {}).get("engine", {})
    eng_a = after.get("components", {}).get("llm", {}).get("engine", {})

    def delta(counter: str) -> int:
        return int(eng_a.get(counter, 0) - eng_b.get(counter, 0))

    # the tokens of sentences the engine took back (rewound_*: the grounding check rejected them
    # as the model wrote them, engine/scheduler.py) were computed, but no student reads them
    delivered = delta("new_tokens") - delta("rewound_tokens")
    summary = summarize(outcomes, wall, delivered, delta("generations"))
    summary["server_rss_mb"] = rss_mb
    for counter in ("prompt_tokens", "reused_tokens", "decode_steps", "rewound_sentences", "rewound_tokens"):
        summary[counter] = delta(counter)
    summary["model"] = after.get("components", {}).get("llm", {}).get("model")
    # background generations for states that got a busy fallback, started while no student waited
    # (included in generations and new tokens), and those that finished (they pause for students)
    for name in ("started", "answered"):
        summary[f"backfill_{name}"] = _counted(before, after, "backfill", name)
    # answers that ran out of budget, by when: no word yet, while writing, a joined backfill
    for stage in ("waiting", "writing", "joined"):
        summary[f"timeouts_{stage}"] = _counted(before, after, "timeouts", stage)
    # students answered fallback-busy at once, by why (the teacher's admission)
    summary["busy"] = {
        reason: _counted(before, after, "busy", reason) for reason in ("late", "short", "crowds", "queue")
    }
    repeats = [o for o in outcomes if o.repeat]
    if repeats:
        again = summarize(repeats, wall, 0, 0)
        summary["asked_again"] = {k: again[k] for k in ("requests", "errors", "by_llm_model", "cache_hits")}
    return summary, outcomes


def save_report(path: Path, report: dict[str, Any]) -> None:
    """The whole report as indented JSON (--json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


def save_answers(path: Path, outcomes: list[Outcome]) -> None:
    """One JSON line per answered request: the headset, its timings, the state it sent and the answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min((o.sent for o in outcomes), default=0.0)
    with path.open("w", encoding="utf-8") as out:
        for o in outcomes:
            if o.answer is not None:
                row = {
                    "headset": o.headset,
                    "repeat": o.repeat,
                    "sent_s": round(o.sent - start, 3),  # since the run's first request
                    "e2e_s": round(o.e2e_s, 3),
                    "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 3),
                    "state": o.state,
                    "answer": o.answer,
                }
                if o.streamed is not None:
                    row["streamed"] = o.streamed
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _counted(before: dict, after: dict, group: str, counter: str) -> int:
    """How much a health `activity` counter grew between two health reports (the run's share)."""

    def read(health: dict) -> int:
        return int(health.get("activity", {}).get(group, {}).get(counter, 0))

    return read(after) - read(before)


# --- entry point -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except BenchUsageError as exc:
        print(f"pulmomed-edge bench: error: {exc}", file=sys.stderr)
        return 2
    with _signals_end_the_run():
        return asyncio.run(_run(args))


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl+C does: SystemExit unwinds through the `finally`
    blocks that stop the servers the run started, instead of leaving them behind."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bench_retrieval() -> dict[str, Any]:
    """Embedding one query, search end to end (p50/p95 ms), and a full index build (s)."""

    from .config import CORPUS_DIR, manifest_path
    from .corpus import load_corpus
    from .index import KnowledgeIndex
    from .lexical import LexicalIndex
    from .model_store import ModelStore
    from .retrieval import Retriever, measure_speed, open_encoder

    settings = Settings.from_env()
    store = ModelStore(settings.models_dir, manifest_path())
    encoder, sha = open_encoder(store, threads=settings.effective_threads)
    try:
        passages = load_corpus(CORPUS_DIR)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            index = KnowledgeIndex.build(
                passages, encoder, Path(tmp) / "index", encoder_sha256=sha, progress=False
            )
            build_s = time.perf_counter() - started
            retriever = Retriever(index, encoder, LexicalIndex(index.passages))
            queries = [
                json.loads(line)["query"] for line in EVAL_QUERIES.read_text(encoding="utf-8").splitlines()
            ]
            speed = measure_speed(retriever, queries, rounds=5)
            index.close()
    finally:
        encoder.close()
    return {"passages": len(passages), "index_build_s": round(build_s, 1), **speed}


async def _run(args: argparse.Namespace) -> int:
    if args.retrieval or args.invariance:
        if args.retrieval:
            report = {"machine": machine_info(), "retrieval": await asyncio.to_thread(bench_retrieval)}
        else:
            from .bench_reference import run_invariance

            report = {"machine": machine_info(), "invariance": await asyncio.to_thread(run_invariance, args)}
        if args.json:
            save_report(args.json, report)
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    report: dict[str, Any] = {"machine": machine_info(), "args": _args_json(args)}
    runs, answered = [], []
    for i in range(args.runs):
        summary, outcomes = await _our_run(args)
        runs.append(summary)
        answered = answered if i else outcomes  # later runs keep theirs only in the report
        if "server_stopped" in summary:
            break
    report["pulmomed"] = runs[0]
    if len(runs) > 1:
        report["runs"] = runs
        report["spread"] = spread(runs)
    if args.baseline:
        from .bench_reference import run_baseline

        plans = plan_requests(args.headsets, args.requests, args.mix, args.seed, args.identical)
        report["baseline"] = await _reference(run_baseline(args, plans))
    if args.ceiling:
        from .bench_reference import run_ceiling

        report["ceiling"] = await _reference(asyncio.to_thread(run_ceiling, args))
    # the report first: nothing after the run may lose what it measured
    if args.json:
        save_report(args.json, report)
    if args.save_answers:
        save_answers(args.save_answers, answered)
    print_table(report)
    if args.json:
        print(f"\nJSON: {args.json}")
    stopped = [run["server_stopped"] for run in runs if "server_stopped" in run]
    if stopped:
        print(f"bench: {stopped[0]}; the report holds what was measured until then", file=sys.stderr)
        return 1
    return 0


async def _reference(measure: Any) -> dict[str, Any]:
    """A baseline or ceiling measurement, or its error (our run is reported either way)."""
    try:
        return dict(await measure)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def _our_run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Outcome]]:
    """One load run against a running server on loopback, or a freshly spawned one."""
    if args.url:
        await wait_healthy(args.url, None)
        return await run_load(args.url, args, None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = spawn_server(args, port)
    try:
        await wait_healthy(base, server)
        summary, outcomes = await run_load(base, args, server.pid)
        if "server_stopped" in summary and server.exited:
            summary["server_exit_code"] = server.returncode
            summary["server_last_lines"] = server.tail()
        return summary, outcomes
    finally:
        server.stop()


SPREAD_FIELDS = {
    "fallback rate": ("fallback_rate",),
    "generations": ("generations",),
    "cache hits": ("cache_hits",),
    "tok/s (aggregate)": ("tok_per_s",),
    "TTFT p50 s": ("ttft_s", "p50"),
    "end-to-end p99 s": ("e2e_s", "p99"),
    "prompt tokens": ("prompt_tokens",),
    "timeouts waiting": ("timeouts_waiting",),
    "timeouts writing": ("timeouts_writing",),
}


def _at(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at path in a nested report, or None where a level is missing."""
    v: Any = report
    for key in path:
        v = v.get(key) if isinstance(v, dict) else None
    return v


def spread(runs: list[dict[str, Any]]) -> dict[str, list[float] | None]:
    """[min, median, max] of each headline figure over repeated runs (None where a run lacks it)."""
    out: dict[str, list[float] | None] = {}
    for label, path in SPREAD_FIELDS.items():
        values = [_at(run, path) for run in runs]
        if any(v is None for v in values):
            out[label] = None
            continue
        values.sort()
        out[label] = [values[0], statistics.median(values), values[-1]]
    return out


def machine_info() -> dict[str, Any]:
    import platform

    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        mem = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version()}


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


TABLE_ROWS = [
    ("requests", ("requests",)),
    ("errors", ("errors",)),
    ("cut answers", ("cut_answers",)),
    ("trimmed answers", ("trimmed_answers",)),
    ("sentences taken back", ("rewound_sentences",)),
    ("fallback rate", ("fallback_rate",)),
    ("  of which content", ("content_fallback_rate",)),
    ("generations", ("generations",)),
    ("backfill started", ("backfill_started",)),
    ("backfill answered", ("backfill_answered",)),
    ("timeouts waiting", ("timeouts_waiting",)),
    ("timeouts writing", ("timeouts_writing",)),
    ("timeouts joined", ("timeouts_joined",)),
    ("busy late/short/crowds/queue", ("busy",)),
    ("cache hits", ("cache_hits",)),
    ("cache hit p99 ms", ("cache_hit_e2e_ms", "p99")),
    ("tok/s (aggregate)", ("tok_per_s",)),
    ("TTFT p50 s", ("ttft_s", "p50")),
    ("TTFT p95 s", ("ttft_s", "p95")),
    ("TTFT p99 s", ("ttft_s", "p99")),
    ("end-to-end p50 s", ("e2e_s", "p50")),
    ("end-to-end p95 s", ("e2e_s", "p95")),
    ("end-to-end p99 s", ("e2e_s", "p99")),
    ("server RSS MB", ("server_rss_mb",)),
]
NO_TTFT = "n/a"  # without --stream an answer arrives whole: its "TTFT" is its end-to-end time


def print_table(report: dict[str, Any]) -> None:
    ours, base = report.get("pulmomed", {}), report.get("baseline", {})
    streamed = report.get("args", {}).get("stream", True)
    width = max(len(label) for label, _ in TABLE_ROWS)

    def cell(d: dict, path: tuple[str, ...]) -> str:
        v = _at(d, path)
        if isinstance(v, dict):  # counts by kind, in the label's order
            return "/".join(str(n) for n in v.values())
        return "-" if v is None else str(v)

    print(f"\nmodel: {ours.get('model')}   answers by model: {ours.get('by_llm_model')}")
    print(f"{'':{width}s} {'pulmomed':>12s} {'baseline':>12s}")
    for label, path in TABLE_ROWS:
        mine = NO_TTFT if path[0] == "ttft_s" and not streamed else cell(ours, path)
        print(f"{label:{width}s} {mine:>12s} {cell(base, path):>12s}")
    if not streamed:
        print(f"TTFT {NO_TTFT} for pulmomed: without --stream each answer arrives whole (see end-to-end)")
    if "server_stopped" in ours:
        print(f"{ours['server_stopped']} (exit code {ours.get('server_exit_code', '?')})")
        if ours.get("server_last_lines"):
            print(ours["server_last_lines"])
    if "asked_again" in ours:
        again = ours["asked_again"]
        print(f"asked again: {again['requests']} requests, answers by model: {again['by_llm_model']}")
    if base.get("error"):
        print(f"baseline failed: {base['error']}")
    if "ceiling" in report:
        ceiling = report["ceiling"]
        if ceiling.get("error"):
            print(f"ceiling failed: {ceiling['error']}")
        else:
            print(f"ceiling (raw batched decode): {ceiling.get('tok_per_s')} tok/s")
    if "spread" in report:
        print(f"\nover {len(report['runs'])} runs of ours (min / median / max):")
        for label, values in report["spread"].items():
            if label.startswith("TTFT") and not streamed:
                continue
            text = "-" if values is None else " / ".join(f"{v:g}" for v in values)
            print(f"{label:{width}s} {text}")
