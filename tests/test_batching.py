"""Batch invariance where llama.cpp switches kernels: a second, real engine on the test model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pulmomed_edge.config import manifest_path
from pulmomed_edge.engine import DoneEvent, GenerationEngine, GenerationTask, SamplingParams
from pulmomed_edge.engine.batching import ROW_COST_SHARE, BatchPlan, StepCost
from pulmomed_edge.engine.chat import ChatTemplate
from pulmomed_edge.engine.runtime import LlamaRuntime, RuntimeConfig
from pulmomed_edge.engine.scheduler import _pack
from pulmomed_edge.prompts import EXPLANATION_LABEL, SYSTEM_PROMPT

# SmolLM2-135M Q4_1 computes a row differently in calls of 64 rows or more; chunks of 128 put every
# prompt chunk past that switch, and decoding below it
CHUNK = 128
SLOTS = 4


@pytest.fixture(scope="module")
def runtime(models_dir: Path):
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    path = store.verify(store.default_name("llm", test=True))
    # a cache stream per sequence: cells stay in position order (see the test at the end of
    # this group); the row classes are what this module tests
    config = RuntimeConfig(model_path=path, n_ctx=SLOTS * 640, n_seq=SLOTS, n_threads=1, unified=False)
    rt = LlamaRuntime(config)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def engine(runtime: LlamaRuntime):
    template = ChatTemplate.from_runtime(runtime)
    system_part = template.render(SYSTEM_PROMPT, "\x00", "").split("\x00")[0]
    eng = GenerationEngine(runtime, slots=SLOTS, prefill_chunk=CHUNK)
    eng.start(warm_prefix=runtime.tokenize(system_part))
    eng.template = template  # type: ignore[attr-defined]  # for the prompts below
    yield eng
    eng.stop()


def _prompt(engine, text: str) -> list[int]:
    return engine.rt.tokenize(engine.template.render(SYSTEM_PROMPT, text, EXPLANATION_LABEL))


def _submit(engine, prompt: list[int], max_new_tokens: int) -> tuple[threading.Event, dict]:
    done, out = threading.Event(), {}

    def sink(event):
        if isinstance(event, DoneEvent):
            out["text"] = event.text
            done.set()

    params = SamplingParams(temperature=0.0)
    engine.submit(GenerationTask(prompt=prompt, sink=sink, max_new_tokens=max_new_tokens, params=params))
    return done, out


def _alone(engine, prompt: list[int], max_new_tokens: int = 24) -> str:
    done, out = _submit(engine, prompt, max_new_tokens)
    assert done.wait(120)
    return out["text"]


def test_prompt_chunks_of_128_stay_past_the_switch_and_decode_calls_below_it(engine):
    plan = engine.plan
    assert (plan.prefill_min, plan.prefill_max) == (64, 191) and plan.decode_rows < 64
    assert not plan.mixes(64, 1)
    assert BatchPlan.for_chunk(32).mixes(47, 16) and not BatchPlan.for_chunk(32).mixes(47, 17)


def test_greedy_output_is_the_same_alone_and_beside_decoding_students(engine):
    """A prompt whose last chunk, beside three decoding students, would cross 64 rows per call.

    The switch is at 64 rows on the AVX2 machines and on this AVX-512 one (a row's logits are
    bit-identical in calls of 1..63 rows and of 64..200, twelfth round). With one unified cache
    this failed here all the same, for another reason: llama.cpp put a decode cell before the
    prompt's own cells, and attention sums cells in cache order. A stream per sequence keeps
    them in order; the unified default does not promise it (test_classroom, BENCHMARKS.md)."""
    warm = len(engine._warm_prefix)
    # the prompt's last 128-aligned chunk has 62 tokens, as many as fit below the switch
    words, late = 0, []
    while True:
        late = _prompt(engine, "Pregunta sobre el estadio IIIA: " + "detalle " * words)
        if len(late) > warm + 64 and len(late) % CHUNK == 62:
            break
        words += 1
        assert words < 400
    questions = ("¿Qué es el estadio IA?", "¿Qué es el estadio IIB?", "¿Qué es el estadio IV?")
    others = [_prompt(engine, q) for q in questions]
    alone = _alone(engine, late)

    running = [_submit(engine, p, 160) for p in others]
    deadline = time.monotonic() + 60
    while engine.counters["decode_steps"] == 0 or not all(
        s.busy and not s.in_prompt for s in engine.slots if s.task and s.task.prompt in others
    ):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    beside = _alone(engine, late)
    for done, _ in running:
        assert done.wait(120)
    assert alone and beside == alone


def test_prompt_chunks_stay_within_one_class_of_rows():
    for chunk in (16, 32, 48, 64, 128):
        plan = BatchPlan.for_chunk(chunk)
        assert plan.prefill_min >= 8 and (plan.prefill_max < 64 or plan.prefill_min >= 64)
        for decode_rows in (None, 0, 16, 40):
            for pending in range(plan.prefill_min, 600):
                left, sizes = pending, []
                while left:
                    sizes.append(plan.prompt_rows(left, decode_rows))
                    left -= sizes[-1]
                assert all(plan.prefill_min <= n <= plan.prefill_max for n in sizes), (
                    chunk,
                    decode_rows,
                    pending,
                    sizes,
                )
    with pytest.raises(ValueError):
        BatchPlan.for_chunk(8)


def test_a_chunk_fills_the_room_its_call_has_beside_the_decode_rows():
    """A call carrying 16 decode rows and a 32-row chunk has room for 15 more prompt rows in the
    same class (16..47 rows, the call under 64): the chunk takes them; beside 40 decode rows it
    keeps its usual size (and gets a call of its own)."""
    plan = BatchPlan.for_chunk(32)
    assert plan.prompt_rows(500, 16) == 47 and plan.mixes(47, 16)
    assert plan.prompt_rows(500, 0) == 47  # never past the class
    assert plan.prompt_rows(500, 40) == 32 and not plan.mixes(32, 40)
    assert plan.prompt_rows(500) == 32
    assert BatchPlan.for_chunk(128).prompt_rows(500, 0) == 128


def test_decode_rows_are_packed_evenly_and_in_order():
    a, b, c = object(), object(), object()
    groups = _pack([(a, 1), (b, 5), (c, 2)], limit=7)  # 8 rows, at most 7 a call
    assert [sum(n for _, n in g) for g in groups] == [4, 4]
    assert groups == [[(a, 1), (b, 3)], [(b, 2), (c, 2)]]
    assert _pack([], 7) == [] and len(_pack([(a, 1)] * 8, 7)) == 2


def test_step_cost_learns_call_costs_by_row_count_and_fills_the_gaps():
    cost = StepCost(lone_s=0.05)
    # nothing seen: a lone row's default, each extra row a share of it
    assert cost.predict(1) == pytest.approx(0.05)
    assert cost.predict(3) == pytest.approx(0.05 * (1 + 2 * ROW_COST_SHARE))
    cost.observe(1, 0.040)
    cost.observe(8, 0.200)
    assert cost.predict(1) == pytest.approx(0.040)
    assert cost.predict(4) == pytest.approx(0.040 + 3 / 7 * 0.160)  # between the two seen
    # beyond the largest seen: that call's lone-row equivalent, plus the share per extra row
    lone = 0.200 / (1 + 7 * ROW_COST_SHARE)
    assert cost.predict(16) == pytest.approx(lone * (1 + 15 * ROW_COST_SHARE))
    cost.observe(8, 0.300)  # a moving average, not the last value
    assert 0.200 < cost.predict(8) < 0.300
    assert cost.as_dict() == {"1": 0.04, "8": round(0.8 * 0.2 + 0.2 * 0.3, 4)}
