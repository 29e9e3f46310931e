"""The engine's promises at its edges, on a real engine and the test model: every task it accepts
hears a final event (also on shutdown), a task it cannot set up fails alone, and a prompt it could
never evaluate is refused at the door."""

from __future__ import annotations

import queue
import sys
import time
from pathlib import Path

import pytest

from pulmomed_edge.config import manifest_path
from pulmomed_edge.engine import (
    DoneEvent,
    ErrorEvent,
    GenerationBackend,
    GenerationEngine,
    GenerationTask,
    SamplingParams,
    TextEvent,
    scheduler,
)
from pulmomed_edge.engine.chat import ChatTemplate
from pulmomed_edge.engine.runtime import LlamaRuntime, RuntimeConfig
from pulmomed_edge.prompts import ANSWER_GRAMMAR, EXPLANATION_LABEL, SYSTEM_PROMPT

# an answer that can only stop at max_new_tokens (the grammar never allows the end of text)
NEVER_ENDS = "root ::= [a-z ] root"
# a guard against hanging the suite, not a speed target: events normally come within a second
HANG_S = 120


@pytest.fixture
def runtime(models_dir: Path):
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    path = store.verify(store.default_name("llm", test=True))
    rt = LlamaRuntime(RuntimeConfig(model_path=path, n_ctx=2 * 640, n_seq=2, n_threads=1))
    yield rt
    rt.close()


@pytest.fixture
def engine(runtime: LlamaRuntime):
    eng = GenerationEngine(runtime, slots=2, parked=0)
    eng.start()
    yield eng
    eng.stop()


def _task(runtime: LlamaRuntime, *, grammar: str | None = ANSWER_GRAMMAR, max_new_tokens: int = 400):
    template = ChatTemplate.from_runtime(runtime)
    prompt = runtime.tokenize(template.render(SYSTEM_PROMPT, "Paciente: 60-69 años.", EXPLANATION_LABEL))
    events: queue.Queue = queue.Queue()
    task = GenerationTask(
        prompt=prompt,
        sink=events.put,
        grammar=grammar,
        params=SamplingParams(temperature=0.0),
        max_new_tokens=max_new_tokens,
    )
    return task, events


def _final(events: queue.Queue):
    while True:
        event = events.get(timeout=HANG_S)
        if not isinstance(event, TextEvent):
            return event


def test_the_engine_is_a_backend_the_teacher_can_drive(engine):
    """teacher.py needs only GenerationBackend (engine/backend.py), the seam for a scale-out mode;
    the in-process engine must keep providing all of it, with the admission answers' shapes."""
    assert isinstance(engine, GenerationBackend)
    assert engine.running and engine.idle and engine.failure is None and engine.stalled_s() == 0.0
    first_token_s, per_token_s = engine.estimate(engine.new_prompt_tokens([1, 2, 3]))
    assert first_token_s >= 0 and per_token_s > 0 and engine.crowds(10) in (True, False)
    assert {"queued", "active"} <= engine.stats().keys()


def test_stopping_the_engine_ends_the_answers_still_writing(engine, runtime):
    task, events = _task(runtime)
    engine.submit(task)
    assert isinstance(events.get(timeout=HANG_S), TextEvent)  # it is writing
    engine.stop()
    final = _final(events)  # before the fix, nothing ever came: the caller waited forever
    assert isinstance(final, ErrorEvent) and "detenido" in final.message
    assert not engine.worker_alive
    assert all(slot.task is None and slot.sampler is None for slot in engine.slots)


def test_a_task_whose_sampler_cannot_be_set_up_fails_alone(engine, runtime):
    broken, broken_events = _task(runtime, grammar='root ::= "sin cerrar')
    good, good_events = _task(runtime, max_new_tokens=24)
    engine.submit(broken)
    engine.submit(good)
    assert isinstance(_final(broken_events), ErrorEvent)
    assert isinstance(_final(good_events), DoneEvent)  # it used to fail with the whole engine
    assert engine.running and engine.failure is None
    assert not any(slot.busy for slot in engine.slots)


def test_an_empty_prompt_is_refused_at_submit(engine, runtime):
    task, _ = _task(runtime)
    task.prompt = []
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(task)  # accepted, it spun the worker forever without an event
    assert engine.running and engine.idle


@pytest.fixture
def small_cache_engine(models_dir: Path):
    """Two slots on a context sized by hand (PULMOMED_N_CTX) far too small for them: 256 cells."""
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    path = store.verify(store.default_name("llm", test=True))
    rt = LlamaRuntime(RuntimeConfig(model_path=path, n_ctx=256, n_seq=2, n_threads=1))
    engine = GenerationEngine(rt, slots=2, parked=0, max_context_per_slot=256)
    engine.start()
    yield engine
    engine.stop()
    rt.close()


OPENINGS = ("Primero:", "Segundo:")


def _submit_long(engine: GenerationEngine, case: int, *, prompt_tokens: int, new_tokens: int):
    text = "El paciente fumador tiene un tumor de pulmón en estadio IIIA y recibe quimioterapia. " * 12
    sink: queue.Queue = queue.Queue()
    engine.submit(
        GenerationTask(
            # prompts that differ from their first token: nothing to reuse, a slot of its own
            prompt=engine.rt.tokenize(f"{OPENINGS[case]} {text}")[:prompt_tokens],
            sink=sink.put,
            grammar=NEVER_ENDS,
            params=SamplingParams(temperature=0.0),
            max_new_tokens=new_tokens,
        )
    )
    return sink


def test_a_full_cache_fails_the_youngest_answer_not_every_one(small_cache_engine):
    """Two answers writing together outgrow the cache: the newer one gives its cells up and the
    older one ends normally (both used to fail in the same call)."""
    engine = small_cache_engine
    # ~100 prompt tokens each: both prompts fit, both answers do not
    first = _submit_long(engine, 0, prompt_tokens=100, new_tokens=90)
    second = _submit_long(engine, 1, prompt_tokens=100, new_tokens=90)
    older, younger = _final(first), _final(second)
    assert isinstance(younger, ErrorEvent) and "memoria de contexto llena" in younger.message
    assert isinstance(older, DoneEvent) and older.finish == "length" and older.new_tokens == 90
    assert engine.running and engine.counters["errors"] == 1


def test_a_full_cache_takes_the_cells_idle_slots_keep(small_cache_engine):
    """A finished answer's slot keeps its cells for prefix reuse; a new prompt that needs them
    gets them (it used to fail)."""
    engine = small_cache_engine
    done = _final(_submit_long(engine, 0, prompt_tokens=150, new_tokens=10))
    assert isinstance(done, DoneEvent) and max(len(s.kv_tokens) for s in engine.slots) >= 150
    other = _final(_submit_long(engine, 1, prompt_tokens=150, new_tokens=10))  # 300 > 256 cells
    assert isinstance(other, DoneEvent) and other.new_tokens == 10
    assert engine.counters["errors"] == 0 and engine.memory_mismatches() == []


def test_stopping_during_the_warm_up_stops_within_a_chunk(models_dir: Path):
    """Ctrl+C while the shared prefix was being evaluated waited for all of it (stop() gave up
    after 10 s and the process then died inside llama_decode)."""
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    path = store.verify(store.default_name("llm", test=True))
    rt = LlamaRuntime(RuntimeConfig(model_path=path, n_ctx=4096, n_seq=1, n_threads=1))
    engine = GenerationEngine(rt, slots=1, parked=0)
    long_prefix = rt.tokenize("El cáncer de pulmón no microcítico se estadifica con el TNM. " * 250)[:3500]
    try:
        engine.start(warm_prefix=long_prefix)
        engine.stop(timeout=HANG_S)
        assert not engine.worker_alive
        assert engine.slots[0].kv_tokens != long_prefix  # it did not evaluate the whole prefix first
    finally:
        engine.stop()
        rt.close()


def test_a_student_leaving_a_joined_background_task_mid_step_never_fails_the_engine(runtime, monkeypatch):
    """A student who joined a backfill and leaves clears its deadline from the event loop at any
    instant. Replayed deterministically: the deadline goes between the worker's check of it and
    its use (a thread switch inside `slot.live`). The worker asserted it was still there and died:
    every answer writing got «El motor de generación falló», and every later student a summary."""
    engine = GenerationEngine(runtime, slots=2, parked=0, prefill_chunk=16)
    armed = {"task": None}
    live = scheduler._Slot.live.fget

    def live_then_leave(slot):
        result = live(slot)
        task = armed["task"]
        if task is not None and slot.task is task and sys._getframe(1).f_code.co_name == "_chunk_makes_late":
            armed["task"] = None
            task.demote()  # the joined student's stream() ends at this instant
        return result

    monkeypatch.setattr(scheduler._Slot, "live", property(live_then_leave))
    engine.start()
    try:
        joined_events: queue.Queue = queue.Queue()
        joined = GenerationTask(
            prompt=runtime.tokenize("Alfa: hola."),
            sink=joined_events.put,
            grammar=NEVER_ENDS,
            params=SamplingParams(temperature=0.0),
            max_new_tokens=300,
            background=True,
        )
        assert joined.promote(time.monotonic() + 60)  # a backfill a student joined
        engine.submit(joined)
        assert isinstance(joined_events.get(timeout=HANG_S), TextEvent)  # it is writing
        armed["task"] = joined
        other_events: queue.Queue = queue.Queue()
        engine.submit(
            GenerationTask(
                prompt=runtime.tokenize("Beta: " + "El paciente fumador tiene un tumor. " * 8),
                sink=other_events.put,
                grammar=NEVER_ENDS,
                params=SamplingParams(temperature=0.0),
                max_new_tokens=20,
                deadline=time.monotonic() + 60,
            )
        )
        final = _final(other_events)
        assert armed["task"] is None, "the replay never reached the step it tests"
        assert isinstance(final, DoneEvent) and final.finish == "length", final
        assert engine.failure is None and engine.running
    finally:
        engine.stop()


def test_the_warm_up_measures_this_machines_prompt_speed(runtime):
    """Admission's first estimates used a guess from the AVX2 laptop (80 prompt tokens/s); on a
    faster CPU a class's first questions were refused as too slow to answer. The warm-up, which
    reads the shared system prompt anyway, now sets the rate it measured."""
    engine = GenerationEngine(runtime, slots=2, parked=0)
    template = ChatTemplate.from_runtime(runtime)
    prefix = runtime.tokenize(template.render(SYSTEM_PROMPT, "x"))[:48]
    assert engine.prefill_rate == scheduler.PREFILL_RATE_GUESS
    began = time.monotonic()
    engine.start(warm_prefix=prefix)
    try:
        deadline = time.monotonic() + HANG_S
        while engine.slots[-1].kv_tokens != prefix:  # the warm-up is done once every slot has it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        elapsed = time.monotonic() - began
        assert engine.prefill_rate != scheduler.PREFILL_RATE_GUESS
        assert engine.prefill_rate >= len(prefix) / elapsed  # it timed the warm-up alone
    finally:
        engine.stop()
