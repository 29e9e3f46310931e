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
import ipaddress
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Settings

API = "/api/v1/consultar_profesor"
# the student-style questions the retrieval speed is measured on (shipped with the package)
EVAL_QUERIES = Path(__file__).resolve().parent / "knowledge" / "eval_queries.jsonl"
SENTENCE_END = (".", "!", "?", ".)", ".]")
TRAILING_CITATION = re.compile(r"\s*\[\d+\]$")


def add_bench_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="simulate a classroom of headsets against a server")
    b.add_argument("--url", default="", help="a running server on loopback (default: spawn one)")
    b.add_argument("--spawn", action="store_true", help="start our own server for the run")
    b.add_argument("--model", default="", help="model store name for --spawn/--baseline/--ceiling")
    b.add_argument("--test-models", action="store_true", help="use the small test models")
    b.add_argument("--slots", type=int, default=8)
    b.add_argument("--headsets", type=int, default=16)
    b.add_argument("--requests", type=int, default=2, help="requests per headset")
    b.add_argument(
        "--think", type=float, default=0.0, help="mean think time (s), exponential; 0 = all at once"
    )
    b.add_argument("--mix", default="libre:0.7,biblioteca:0.3")
    b.add_argument("--stream", action="store_true", help="use the streaming endpoint (true TTFT)")
    b.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer")
    b.add_argument("--budget", type=float, default=0.0, help="spawned server's budget (s); 0 = default")
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
    weights = {k: float(v) for k, v in (part.split(":") for part in mix.split(","))}
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


async def _headset(
    i: int, base: str, plan: list[dict], args: argparse.Namespace, t_end: float
) -> list[Outcome]:
    import aiohttp

    local = None if args.no_source_ips else (f"127.0.{(i + 2) // 254}.{(i + 2) % 254 or 1}", 0)
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


def summarize(outcomes: list[Outcome], wall_s: float, new_tokens: int, generations: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    e2e = [o.e2e_s for o in ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    hits = [o.e2e_s for o in ok if o.cache == "hit"]
    by_model: dict[str, int] = {}
    for o in ok:
        by_model[o.llm_model] = by_model.get(o.llm_model, 0) + 1
    fallbacks = sum(v for k, v in by_model.items() if k.startswith("fallback-"))
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
        "cache_hits": sum(o.cache == "hit" for o in ok),
        "shared": sum(o.cache == "shared" for o in ok),
        "generations": generations,
        "new_tokens": new_tokens,
        "wall_s": round(wall_s, 2),
        "tok_per_s": round(new_tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_s": {"p50": _pct(ttft, 50), "p95": _pct(ttft, 95), "p99": _pct(ttft, 99)},
        "cache_hit_e2e_ms": {
            q: (None if v is None else round(v * 1000, 2))
            for q, v in (("p50", _pct(hits, 50)), ("p99", _pct(hits, 99)))
        },
        "e2e_s": {"p50": _pct(e2e, 50), "p95": _pct(e2e, 95), "p99": _pct(e2e, 99)},
    }


# --- servers -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loop = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loop = False
    if not loop:
        raise SystemExit(f"bench only targets loopback addresses, not {host!r}")
    return url.rstrip("/")


async def _get_json(url: str) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def _wait_healthy(base: str, proc: subprocess.Popen | None, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            status, body = await _get_json(base + "/api/v1/health")
            if body.get("status") != "starting":
                if status != 200:
                    raise SystemExit(f"server is not healthy: {json.dumps(body, ensure_ascii=False)}")
                return body
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("server did not become healthy in time")


def _spawn_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if args.budget:
        env["PULMOMED_BUDGET_S"] = str(args.budget)
    env.update(
        PULMOMED_MAX_NEW_TOKENS=str(args.max_tokens),
        PULMOMED_SLOTS=str(args.slots),
        PULMOMED_RATE_LIMIT_PER_MIN=os.environ.get("PULMOMED_RATE_LIMIT_PER_MIN", "10"),
    )
    # a frozen bundle's executable is the CLI itself; from source, run the package
    program = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "pulmomed_edge"]
    cmd = [*program, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    if args.test_models:
        cmd.append("--test-models")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RssSampler:
    """Peak resident memory of a process, sampled while the load runs."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while True:
            self.peak = max(self.peak, proc.memory_info().rss)
            await asyncio.sleep(0.25)

    def start(self) -> None:
        if self.pid:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> int:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        return self.peak


async def run_load(base: str, args: argparse.Namespace, server_pid: int | None) -> dict[str, Any]:
    plans = plan_requests(args.headsets, args.requests, args.mix, args.seed, args.identical)
    _, before = await _get_json(base + "/api/v1/health")
    sampler = RssSampler(server_pid)
    sampler.start()
    started = time.perf_counter()
    t_end = started + args.duration
    results = await asyncio.gather(*(_headset(i, base, plans[i], args, t_end) for i in range(args.headsets)))
    wall = time.perf_counter() - started
    rss = await sampler.stop()
    _, after = await _get_json(base + "/api/v1/health")
    eng_b = before["components"]["llm"].get("engine", {})
    eng_a = after["components"]["llm"].get("engine", {})
    outcomes = [o for r in results for o in r]
    summary = summarize(
        outcomes,
        wall,
        eng_a.get("new_tokens", 0) - eng_b.get("new_tokens", 0),
        eng_a.get("generations", 0) - eng_b.get("generations", 0),
    )
    summary["server_rss_mb"] = round(rss / 2**20, 1) if rss else None
    for counter in ("prompt_tokens", "reused_tokens", "decode_steps"):
        summary[counter] = eng_a.get(counter, 0) - eng_b.get(counter, 0)
    summary["model"] = after["components"]["llm"].get("model")
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
    if args.save_answers:
        save_answers(args.save_answers, outcomes)
    repeats = [o for o in outcomes if o.repeat]
    if repeats:
        again = summarize(repeats, wall, 0, 0)
        summary["asked_again"] = {k: again[k] for k in ("requests", "errors", "by_llm_model", "cache_hits")}
    return summary


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
    return asyncio.run(_run(args))


def bench_retrieval() -> dict[str, Any]:
    """Embedding one query, search end to end (p50/p95 ms), and a full index build (s)."""
    import tempfile

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
        print(json.dumps(report, ensure_ascii=False, indent=2))
        if args.json:
            save_report(args.json, report)
        return 0
    if args.runs < 1 or (args.runs > 1 and args.url and not args.spawn):
        raise SystemExit("--runs needs a spawned server (--spawn) and is at least 1")
    report: dict[str, Any] = {"machine": machine_info(), "args": _args_json(args)}
    runs = []
    for i in range(args.runs):
        # later runs keep their answers only in the report, not in --save-answers
        run_args = args if i == 0 else argparse.Namespace(**{**vars(args), "save_answers": None})
        runs.append(await _our_run(run_args))
    report["pulmomed"] = runs[0]
    if len(runs) > 1:
        report["runs"] = runs
        report["spread"] = spread(runs)
    if args.baseline:
        from .bench_reference import run_baseline

        report["baseline"] = await run_baseline(
            args, plan_requests(args.headsets, args.requests, args.mix, args.seed, args.identical)
        )
    if args.ceiling:
        from .bench_reference import run_ceiling

        report["ceiling"] = await asyncio.to_thread(run_ceiling, args)
    print_table(report)
    if args.json:
        save_report(args.json, report)
        print(f"\nJSON: {args.json}")
    return 0


async def _our_run(args: argparse.Namespace) -> dict[str, Any]:
    """One load run against a running server on loopback, or a freshly spawned one."""
    proc = None
    if args.url and not args.spawn:
        base = _check_loopback(args.url)
    else:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = _spawn_server(args, port)
    try:
        await _wait_healthy(base, proc)
        return await run_load(base, args, proc.pid if proc else None)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def print_table(report: dict[str, Any]) -> None:
    rows = [("", "pulmomed", "baseline")]
    ours, base = report.get("pulmomed", {}), report.get("baseline", {})

    def cell(d: dict, *path: str) -> str:
        v = _at(d, path)
        if isinstance(v, dict):  # counts by kind, in the label's order
            return "/".join(str(n) for n in v.values())
        return "-" if v is None else str(v)

    for label, path in [
        ("requests", ("requests",)),
        ("errors", ("errors",)),
        ("cut answers", ("cut_answers",)),
        ("trimmed answers", ("trimmed_answers",)),
        ("fallback rate", ("fallback_rate",)),
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
    ]:
        rows.append((label, cell(ours, *path), cell(base, *path)))
    print(f"\nmodel: {ours.get('model')}   answers by model: {ours.get('by_llm_model')}")
    for r in rows:
        print(f"{r[0]:20s} {r[1]:>12s} {r[2]:>12s}")
    if "asked_again" in ours:
        again = ours["asked_again"]
        print(f"asked again: {again['requests']} requests, answers by model: {again['by_llm_model']}")
    if "ceiling" in report:
        print(f"ceiling (raw batched decode): {report['ceiling'].get('tok_per_s')} tok/s")
    if "spread" in report:
        print(f"\nover {len(report['runs'])} runs of ours (min / median / max):")
        for label, values in report["spread"].items():
            text = "-" if values is None else " / ".join(f"{v:g}" for v in values)
            print(f"{label:20s} {text}")
