"""The generation engine: one worker thread, the llama context, and a continuous-batching loop.

Requests are tasks in a bounded queue. Between decode steps the worker admits queued tasks into
free slots (each slot is one KV sequence), reusing the longest cached token prefix any slot holds,
or any of the finished prompts kept in extra sequences ("parked": their cells stay in the cache
after the slot moves on, so a later student with the same stage and passages skips them);
every step decodes one token for each generating slot plus a bounded chunk of prompt for slots
still prefilling, so a long prompt never freezes the others' streams; how many rows each
llama_decode call holds follows the batch plan (batching.py). A background task (the teacher's
backfill) computes only in steps no student's task needs: it pauses, keeping its slot and cells,
while any student's task is in the engine, gives its slot up if a student needs it, and becomes a
student's task when promoted. Events (text, done, error)
go back through each task's `sink`, which must be thread-safe (the teacher wraps the event loop's
call_soon_threadsafe). Nothing else ever touches the context.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .batching import BatchPlan, StepCost
from .markers import marker_overlap
from .runtime import LlamaRuntime, Utf8Stream
from .sampling import GrammarRejected, SamplingParams, SequenceSampler

log = logging.getLogger(__name__)

SENTENCE_END = (".", "!", "?")
# a period right after a digit may be a decimal point the model writes next to ("6.2 cm")
_AFTER_DIGIT = re.compile(r"\d\.$")


def _ends_sentence(text: str) -> bool:
    """Whether the text ends a sentence where the engine may end a section: not at a period right
    after a digit, which may be a decimal point («un tumor escamoso de 6.» was served: the section
    ended as the model wrote "6.2"); the section then ends at the next sentence end."""
    text = text.rstrip()
    return text.endswith(SENTENCE_END) and not _AFTER_DIGIT.search(text)


def _written(slot: _Slot) -> int:
    """The tokens the slot's current section has in its text: its budgets also count those it
    took back (they were computed), its minimum length does not."""
    return slot.new_tokens - slot.phase_start_tokens - slot.phase_rewound


def _reserved(slot: _Slot) -> int:
    """The tokens an answer keeps for the sections still to come: the recommendation's reserve
    while an earlier section is written, none in the last one."""
    task = slot.task
    return RECOMMENDATION_RESERVE if task is not None and slot.phase < len(task.phases) - 1 else 0


def _held(phase: Phase, slot: _Slot, pressed: bool) -> bool:
    """Whether the section goes on past its soft budget, and the model may not end it: its phase
    checks what it keeps (`Phase.keeps`), nothing so far would be kept, and time does not press."""
    return phase.keeps is not None and not slot.section_kept and not pressed


WORKER_NICE = 5  # see _yield_to_the_event_loop
# a pass of the worker's loop (admission and one step, well under 2 s even with the 3B model)
# running this long means the engine is stuck: health says so, and students get the summary at once
STALL_S = 30.0
# prompt tokens/s admission assumes before the engine has measured any (AVX2 laptop, 0.5B model)
PREFILL_RATE_GUESS = 80.0
# near its deadline an answer wraps up: the explanation leaves this many tokens for the
# recommendation, and a section that has MIN_SECTION_TOKENS ends at its next sentence end once
# fewer than WRAP_UP_TOKENS more would fit
RECOMMENDATION_RESERVE = 40
WRAP_UP_TOKENS = 35  # about one sentence of the small model in Spanish
MIN_SECTION_TOKENS = 12
# a sentence its phase's `keeps` rejects is taken back and written again (Phase.keeps), at most
# this many times per answer: each try costs a sentence of decoding
REWINDS_PER_ANSWER = 2
# near its deadline a section ends at its next sentence end (_pressed); a sentence rejected there
# is still taken back while this many tokens fit before the deadline (a short sentence), plus the
# recommendation's reserve when one is still to come
REWIND_ROOM = 24
BARRED = float("-inf")


@dataclass(frozen=True)
class Phase:
    """A section of the answer with a length budget.

    When the model writes `marker` itself, the next phase starts. When the phase reaches
    `soft_tokens` at the end of a sentence, or `hard_tokens` anywhere, the engine writes
    `transition` for it (the last phase simply ends). `keeps`, given the section's newest
    sentence, says whether the answer will keep it (the grounding check). One it rejects is taken
    back (its cells are dropped and the model writes that sentence again, its least likely choice
    barred), up to REWINDS_PER_ANSWER times, so the next sentence does not build on a wrong one;
    the rejected text stays in the answer's text, where the same check withholds it again.
    `retries`, given a sentence `keeps` rejected, says whether it is taken back (None: always);
    one it is not is left where it is and the model goes on after it, where time presses too
    when the section has nothing to keep yet (as a retry would: `_may_rewind` decides). While
    the section has no sentence to keep, it goes on past `soft_tokens` and the model may not end
    it, up to `hard_tokens`, unless time presses. It runs on the engine's thread at each sentence
    end, so it must be a quick pure function."""

    soft_tokens: int
    hard_tokens: int
    marker: str = ""
    transition: str = ""
    keeps: Callable[[str], bool] | None = None
    retries: Callable[[str], bool] | None = None


@dataclass
class TextEvent:
    text: str


@dataclass
class DoneEvent:
    text: str
    finish: Literal["stop", "length", "cancelled", "preempted"]  # preempted: a background task
    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    queued_s: float
    first_token_s: float | None
    total_s: float


@dataclass
class ErrorEvent:
    message: str


EngineEvent = TextEvent | DoneEvent | ErrorEvent


@dataclass
class GenerationTask:
    prompt: list[int]
    sink: Callable[[EngineEvent], None]
    max_new_tokens: int = 200
    phases: tuple[Phase, ...] = ()
    grammar: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() by which the answer should be complete
    # computes only while no student's task needs the engine (see the module docstring)
    background: bool = False
    # the worker gave its slot to a student (it ends "preempted"); never set for a student's task
    preempted: bool = False
    # promote() and the worker's preemption decide under it: a student joins, or the slot goes
    _switch: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def promote(self, deadline: float | None) -> bool:
        """A student now waits on this background task: it competes like theirs, with their deadline
        (any thread: the worker reads each field once per use). False when the worker has already
        given its slot away: it ends "preempted", and the student must be answered otherwise."""
        with self._switch:
            if self.preempted:
                return False
            self.deadline = deadline
            self.background = False
            return True

    def demote(self) -> None:
        """Nobody waits on it any more: background work again, with no deadline (any thread)."""
        with self._switch:
            self.background = True
            self.deadline = None

    def yield_slot(self) -> bool:
        """The worker takes this task's slot for a student: only while it is still background work
        (a student may have joined it this instant). Whether it was taken."""
        with self._switch:
            if not self.background:
                return False
            self.preempted = True
            return True


class EngineBusy(RuntimeError):
    """The queue is full: answer the student at once instead of making them wait."""


class EngineStopped(RuntimeError):
    """The engine is not running (not started, failed, or shut down)."""


@dataclass
class _Slot:
    seq: int
    kv_tokens: list[int] = field(default_factory=list)  # exactly what this sequence's KV holds
    prompt_len: int = 0  # the leading kv_tokens that are (or will be) evaluated as prompt chunks
    task: GenerationTask | None = None
    pending: list[int] = field(default_factory=list)  # tokens to decode before the next sample
    sampler: SequenceSampler | None = None
    stream: Utf8Stream | None = None
    text: str = ""
    new_tokens: int = 0
    phase: int = 0
    phase_start_tokens: int = 0
    phase_start_chars: int = 0
    section_kept: bool = False  # the section has a sentence its phase's `keeps` accepts
    # where the newest sentence began, to take it back (_rewind): the cells kept, the tokens to
    # decode again for the logits there, and where its text starts
    mark_kv: int = 0
    mark_pending: list[int] = field(default_factory=list)
    mark_chars: int = 0
    # the tokens sampled since the mark, each with the probability it was chosen with
    since_mark: list[tuple[int, float]] = field(default_factory=list)
    # choices a try taken back made at the mark: (the tokens before it, the token), barred there
    barred: list[tuple[list[int], int]] = field(default_factory=list)
    rewinds: int = 0  # sentences taken back, or passed over where time pressed (REWINDS_PER_ANSWER)
    phase_rewound: int = 0  # tokens this section took back: computed, but not in its text
    reused: int = 0
    started: float = 0.0
    first_token: float | None = None
    last_used: float = 0.0

    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def live(self) -> bool:
        """Busy with a task a student waits on (not a background one)."""
        task = self.task  # once: the event loop asks while the worker may free the slot
        return task is not None and not task.background

    @property
    def in_prompt(self) -> bool:
        """Still evaluating its prompt (then its pending tokens are prompt rows, not decode rows)."""
        return len(self.kv_tokens) < self.prompt_len


def _yield_to_the_event_loop() -> None:
    """Run this worker (and the llama.cpp threads it starts, which inherit it) at a lower priority.

    llama.cpp keeps every core busy; the event loop needs a core for a few milliseconds at a time
    (cache hits, health, streaming). With equal priority it waits for a time slice; niced, it gets
    the core at once and the engine loses almost nothing. Linux/macOS only; a no-op elsewhere."""
    if not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except OSError:  # not permitted here: run at normal priority
        log.debug("could not lower the engine's priority")


def _has_sentence(text: str) -> bool:
    """Whether text holds at least one finished sentence."""
    return any(f"{mark} " in text for mark in SENTENCE_END)


def _pack(rows: list[tuple[_Slot, int]], limit: int) -> list[list[tuple[_Slot, int]]]:
    """Split slots' decode rows into as few calls of at most `limit` rows as possible, of even
    size; a slot's rows stay in order and may continue in the next call."""
    total = sum(n for _, n in rows)
    if not total:
        return []
    calls = -(-total // max(1, limit))
    size = -(-total // calls)
    groups: list[list[tuple[_Slot, int]]] = [[]]
    room = size
    for slot, n in rows:
        while n:
            if room == 0:
                groups.append([])
                room = size
            take = min(n, room)
            groups[-1].append((slot, take))
            n -= take
            room -= take
    return groups


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class GenerationEngine:
    """Owns the runtime after start(); the only thread that calls llama.cpp is its worker."""

    def __init__(
        self,
        runtime: LlamaRuntime,
        *,
        slots: int,
        parked: int = 0,
        queue_size: int = 32,
        prefill_chunk: int = 32,
        max_context_per_slot: int | None = None,
    ) -> None:
        self.rt = runtime
        self.slots = [_Slot(seq=i) for i in range(slots)]
        # finished prompts kept for reuse, least recently used replaced first (sequence ids after
        # the slots': the runtime needs n_seq >= slots + parked)
        self.parked = [_Slot(seq=slots + i) for i in range(parked)]
        self.queue_size = queue_size
        # Prompts are evaluated one chunk of about this size per step (the oldest request first),
        # so that one long prompt never freezes the others' streams and a cancel is seen within
        # one short step. How many rows each llama_decode call holds is the batch plan's
        # (batching.py): it keeps a call from straddling a kernel switch of llama.cpp's.
        self.plan = BatchPlan.for_chunk(prefill_chunk)
        whole = runtime.n_ctx // max(1, slots) if runtime.config.unified else runtime.n_ctx_seq
        self.max_context_per_slot = min(max_context_per_slot or whole, runtime.n_ctx_seq)
        self._queue: deque[GenerationTask] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._warm_prefix: list[int] = []
        self._period_tokens = sorted({t for t in (runtime.tokenize(".", special=False)[-1:]) if t >= 0})
        # tokens that could start the next section (it begins on a new line); held back until a
        # section has MIN_SECTION_TOKENS, so the small model cannot answer "El." and move on
        newline_tokens = [t for t in range(runtime.n_vocab) if b"\n" in runtime.piece(t)]
        self._no_new_line = dict.fromkeys(newline_tokens, -30.0)
        # end-of-generation tokens: held back while a section has nothing to keep (Phase.keeps)
        self._no_end = dict.fromkeys((t for t in range(runtime.n_vocab) if runtime.is_eog(t)), -30.0)
        self.failure: str | None = None
        self.stall_after_s = STALL_S
        self._pass_started: float | None = None  # when the worker's current pass began (None: waiting)
        # measured speeds for admission: prompt tokens/s, and the cost of decode calls
        self.prefill_rate = PREFILL_RATE_GUESS  # until the warm-up measures it (_warm)
        self.step_cost = StepCost()  # decode-only calls by row count: what admission plans with
        self.token_interval_s = 0.05  # any step that decodes: what a streaming student waits per token
        self.counters = {
            "generations": 0,
            "completed": 0,
            "cancelled": 0,
            "preempted": 0,  # background tasks that gave their slot to a student
            "errors": 0,
            "prompt_tokens": 0,
            "reused_tokens": 0,
            "new_tokens": 0,
            "decode_steps": 0,
            # prompt chunks held back a step so that a student's answer already writing could
            # still end by its deadline
            "deferred_chunks": 0,
            # sentences a phase's `keeps` rejected, taken back and written again, and their tokens
            # (counted in new_tokens too: computed, but no student reads them)
            "rewound_sentences": 0,
            "rewound_tokens": 0,
        }

    # --- public API (any thread) ------------------------------------------------------------
    @property
    def prefill_chunk(self) -> int:
        return self.plan.chunk

    def start(self, warm_prefix: list[int] | None = None) -> None:
        self._warm_prefix = list(warm_prefix or [])
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    def submit(self, task: GenerationTask) -> None:
        with self._cv:
            if not self.running:
                raise EngineStopped(self.failure or "engine not running")
            if len(self._queue) >= self.queue_size:
                raise EngineBusy("queue full")
            if not task.prompt:  # a slot with nothing to evaluate would never sample: it spins
                raise ValueError("empty prompt")
            if len(task.prompt) + task.max_new_tokens > self.max_context_per_slot:
                raise ValueError(
                    f"prompt of {len(task.prompt)} tokens + {task.max_new_tokens} new tokens "
                    f"exceeds the {self.max_context_per_slot}-token slot"
                )
            self._queue.append(task)
            self._cv.notify()

    @property
    def running(self) -> bool:
        """Started, not failed and not shutting down: submit() takes tasks."""
        return not self._stopping and self.worker_alive

    @property
    def worker_alive(self) -> bool:
        """The worker thread still runs (it may be inside a llama.cpp call after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def stalled_s(self) -> float:
        """How long the worker's current pass (admission and a step) has run, once that is
        stall_after_s or more; 0.0 while it keeps up (any thread)."""
        started = self._pass_started
        if started is None:
            return 0.0
        running = time.monotonic() - started
        return running if running >= self.stall_after_s else 0.0

    def stats(self) -> dict[str, int]:
        with self._cv:
            queued = len(self._queue)
        active = sum(1 for s in self.slots if s.busy)
        background = sum(1 for s in self.slots if s.busy and not s.live)
        return {
            **self.counters,
            "queued": queued,
            "active": active,
            "background": background,
            "slots": len(self.slots),
            "parked": sum(1 for p in self.parked if p.kv_tokens),
        }

    def memory_mismatches(self) -> list[str]:
        """Where llama.cpp's cache disagrees with what the engine believes each sequence holds;
        empty when all agree. Reads the context, so call it only while no task runs."""
        found = []
        for kind, entries in (("slot", self.slots), ("parked", self.parked)):
            for entry in entries:
                expected = (0, len(entry.kv_tokens) - 1) if entry.kv_tokens else (-1, -1)
                held = self.rt.seq_positions(entry.seq)
                if held != expected:
                    found.append(f"{kind} seq {entry.seq}: cache holds {held}, engine expects {expected}")
        return found

    def backlog_tokens(self) -> int:
        """Prompt tokens still to evaluate for students: queued tasks (beyond the shared prefix)
        and slots (background tasks pause while students' work goes on, so they do not count)."""
        with self._cv:
            queued = sum(
                max(0, len(t.prompt) - len(self._warm_prefix)) for t in self._queue if not t.background
            )
        return queued + sum(len(s.pending) for s in self.slots if s.live and s.new_tokens == 0)

    @property
    def idle(self) -> bool:
        """No student's task is queued or running (a background task may be)."""
        with self._cv:
            queued = sum(1 for t in self._queue if not t.background)
        return queued == 0 and not any(s.live for s in self.slots)

    def new_prompt_tokens(self, prompt: list[int]) -> int:
        """About how many of this prompt's tokens a task would evaluate if it started now: those
        no slot and no parked prompt holds already, as `_assign` would reuse them (any thread:
        `_reusable` reads each source as one list slice)."""
        held = max([len(self._warm_prefix)] + [self._reusable(s, prompt) for s in self.slots + self.parked])
        return max(min(len(prompt), self.plan.prefill_min), len(prompt) - held)

    def estimate(self, new_tokens: int) -> tuple[float, float]:
        """(seconds until a new task's first token, seconds per token it then decodes), for a task
        that evaluates `new_tokens` of its prompt (new_prompt_tokens).

        The prompts ahead of it and its own are evaluated a chunk per step, and each of those
        steps also carries the students already writing; afterwards it decodes in steps shared
        with everyone admitted so far (who, in a burst, are all still to start writing)."""
        backlog = self.backlog_tokens() + new_tokens
        busy, step_s = self._with_one_more()
        writing = sum(1 for s in busy if not s.in_prompt)
        first_token = self._prompt_s(backlog)
        if writing:
            steps = math.ceil(backlog / self.plan.chunk_beside(writing))
            first_token += steps * self.step_cost.predict(writing)
        return first_token, step_s

    def crowds(self, new_tokens: int, grace_s: float = 0.0) -> bool:
        """Whether a new task evaluating `new_tokens` of its prompt, started now, would push an
        answer already running more than grace_s past its deadline: each running answer still
        needs its prompt and about a short sentence per remaining section, and every step gets
        longer with one more student."""
        new_prompt_s = self._prompt_s(new_tokens)
        busy, step_s = self._with_one_more()
        now = time.monotonic()
        for slot in busy:
            task = slot.task
            deadline = task.deadline if task is not None else None
            if task is None or deadline is None:
                continue
            prompt_s = self._prompt_s(len(slot.pending) if slot.in_prompt else 0)
            spare = self._spare_s(slot, task, deadline, step_s, now) + grace_s - prompt_s
            # an answer already writing holds newer chunks back when it needs the steps
            # (_chunk_makes_late), so the new prompt costs it only the extra row per step (in
            # step_s); one still in its prompt is counted with the new prompt's time as well,
            # which is conservative and is what was measured (BENCHMARKS.md, seventh round)
            if spare < (new_prompt_s if slot.in_prompt else 0.0):
                return True
        return False

    def _with_one_more(self) -> tuple[list[_Slot], float]:
        """The slots busy with students' tasks, and what a decode step will cost once they, the
        students' queued tasks and one more all decode together."""
        with self._cv:
            queued = sum(1 for t in self._queue if not t.background)
        busy = [s for s in self.slots if s.live]
        return busy, self.step_cost.predict(min(len(self.slots), len(busy) + queued + 1))

    def _prompt_s(self, tokens: int) -> float:
        """Seconds to evaluate this many prompt tokens at the measured prefill rate."""
        return tokens / max(1.0, self.prefill_rate)

    def _spare_s(
        self, slot: _Slot, task: GenerationTask, deadline: float, step_s: float, now: float
    ) -> float:
        """Seconds the slot's answer (`task`) has left before `deadline` (its deadline, read once by
        the caller: a student leaving a joined backfill clears it from the event loop at any
        moment) once it has written the fewest tokens it can end with, at step_s per token."""
        return deadline - now - self._tokens_to_finish(slot, task) * step_s

    def _tokens_to_finish(self, slot: _Slot, task: GenerationTask) -> int:
        """About the fewest tokens the slot's answer (`task`) can still end with: each section
        left gets its minimum and then the end of a sentence. The caller reads slot.task once and
        passes it: admission calls this from the event loop, where the worker may free the slot
        meanwhile (the figures are then one step stale, never a crash)."""
        phases = task.phases or (Phase(task.max_new_tokens, task.max_new_tokens),)
        sentence = WRAP_UP_TOKENS // 2
        need = max(0, MIN_SECTION_TOKENS - _written(slot)) + sentence
        need += len(phases[slot.phase + 1 :]) * (MIN_SECTION_TOKENS + sentence + 4)  # 4: its label
        return min(need, task.max_new_tokens - slot.new_tokens)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        _yield_to_the_event_loop()
        try:
            if self._warm_prefix:
                self._warm(self._warm_prefix)
            while True:
                with self._cv:
                    while not self._stopping and not self._queue and not any(s.busy for s in self.slots):
                        self._cv.wait(0.5)
                    if self._stopping:
                        break
                self._pass_started = time.monotonic()
                self._drop_cancelled()
                self._admit()
                if any(s.busy for s in self.slots):
                    self._step()
                self._pass_started = None
        except Exception as exc:  # the worker must never die silently
            log.exception("engine worker failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            # every student still running hears of it (the context is not touched again)
            for slot in self.slots:
                if slot.task is not None:
                    self.counters["errors"] += 1
                    task, slot.task = slot.task, None
                    self._tell(task, ErrorEvent("El motor de generación falló."))
        finally:
            self._pass_started = None
            with self._cv:
                self._stopping = True
                pending = list(self._queue)
                self._queue.clear()
            # on shutdown, answers still writing end too: nobody may wait on a sink forever
            running = [s.task for s in self.slots if s.task is not None]
            for slot in self.slots:
                slot.task = None
                if slot.sampler is not None:
                    slot.sampler.close()
                    slot.sampler = None
            for task in running + pending:
                self._tell(task, ErrorEvent("El motor de generación se ha detenido."))

    @staticmethod
    def _tell(task: GenerationTask, event: EngineEvent) -> None:
        """An event while the worker fails or stops: a sink that raises must not keep the other
        students from theirs (any exception from a sink while running stops the worker)."""
        try:
            task.sink(event)
        except Exception:
            log.exception("could not deliver %s to a task", type(event).__name__)

    def _warm(self, prefix: list[int]) -> None:
        """Evaluate the shared system prefix once and share its KV cells with every slot."""
        first = self.slots[0]
        start = 0
        began = time.monotonic()
        while start < len(prefix):
            if self._stopping:  # a shutdown during start-up: stop within one chunk, not after all
                return
            chunk = prefix[start : start + self.plan.prompt_rows(len(prefix) - start, 0)]
            rc = self.rt.decode([(t, start + i, first.seq, False) for i, t in enumerate(chunk)])
            if rc != 0:
                raise RuntimeError(f"llama_decode failed warming the prefix (code {rc})")
            start += len(chunk)
        if len(prefix) >= 16:
            # admission's first estimates from this machine, not from the guess it starts with:
            # prompts read ~2.4× faster on an AVX-512 CPU than on the AVX2 one that guess is from,
            # and a class's first questions were refused as too slow to answer (BENCHMARKS.md)
            self.prefill_rate = len(prefix) / max(1e-3, time.monotonic() - began)
        first.kv_tokens = list(prefix)
        first.prompt_len = len(prefix)
        for slot in self.slots[1:]:
            self.rt.seq_cp(first.seq, slot.seq, 0, len(prefix))
            slot.kv_tokens = list(prefix)
            slot.prompt_len = len(prefix)
        self.counters["prompt_tokens"] += len(prefix)

    def _drop_cancelled(self) -> None:
        with self._cv:
            kept = deque(t for t in self._queue if not t.cancel.is_set())
            dropped = [t for t in self._queue if t.cancel.is_set()]
            self._queue = kept
        for task in dropped:
            self.counters["cancelled"] += 1
            now = time.monotonic()
            waited = now - task.submitted
            task.sink(DoneEvent("", "cancelled", len(task.prompt), 0, 0, waited, None, waited))
        for slot in self.slots:
            if slot.task and slot.task.cancel.is_set():
                self._finish(slot, "cancelled")

    def _admit(self) -> None:
        """Queued tasks into free slots, students' tasks first; a student who finds every slot
        taken gets the slot of a background task (which ends "preempted")."""
        while True:
            with self._cv:
                task = next((t for t in self._queue if not t.background), None)
                if task is None and self._queue:
                    task = self._queue[0]
            if task is None:
                return
            free = [s for s in self.slots if not s.busy]
            if not free and not task.background:
                paused = [s for s in self.slots if s.busy and not s.live]
                if paused:
                    victim = min(paused, key=lambda s: s.new_tokens)  # the least work lost
                    if self._preempt(victim):
                        free = [victim]
                    else:  # a student joined it meanwhile: it is theirs now, look again
                        continue
            if not free:
                return
            with self._cv:  # by identity: tasks are dataclasses, two may compare equal
                self._queue = deque(t for t in self._queue if t is not task)
            self._assign(task, free)

    def _assign(self, task: GenerationTask, free: list[_Slot]) -> None:
        try:  # before any slot changes: a sampler llama.cpp refuses fails this task, not everyone
            sampler = SequenceSampler(self.rt, task.grammar, task.params)
        except Exception as exc:
            log.exception("could not set up sampling for a task")
            self.counters["errors"] += 1
            self._tell(task, ErrorEvent(f"No se pudo preparar la generación: {exc}"))
            return
        prompt = task.prompt

        def reusable(slot: _Slot) -> int:
            return self._reusable(slot, prompt)

        if self.rt.config.unified:
            dst = max(free, key=lambda s: (reusable(s), -s.last_used))
        else:
            # a prefix is copied from wherever it is anyway; the lowest free slot keeps the busy
            # ones consecutive (see _step)
            dst = min(free, key=lambda s: s.seq)
        own = reusable(dst)
        src = max(self.slots + self.parked, key=reusable)
        best = reusable(src)
        if best > own and src is not dst:
            # borrow another slot's (or a parked) cached prefix: cells are shared, not recomputed
            if src in self.parked:
                src.last_used = time.monotonic()
            self.rt.seq_rm(dst.seq, -1, -1)
            self.rt.seq_cp(src.seq, dst.seq, 0, best)
            dst.kv_tokens = list(prompt[:best])
            own = best
        reuse = own
        self.rt.seq_rm(dst.seq, reuse, -1)
        del dst.kv_tokens[reuse:]
        dst.prompt_len = len(prompt)
        dst.task = task
        dst.pending = list(prompt[reuse:])
        dst.sampler = sampler
        dst.stream = Utf8Stream()
        dst.text = ""
        dst.new_tokens = 0
        dst.phase = 0
        dst.phase_start_tokens = 0
        dst.phase_start_chars = 0
        dst.section_kept = False
        # the first sentence's mark: the prompt's last token gives the first logits again
        dst.mark_kv, dst.mark_pending, dst.mark_chars = len(prompt) - 1, prompt[-1:], 0
        dst.since_mark, dst.barred, dst.rewinds, dst.phase_rewound = [], [], 0, 0
        sampler.checkpoint()
        dst.reused = reuse
        dst.started = time.monotonic()
        dst.first_token = None
        self.counters["generations"] += 1
        self.counters["reused_tokens"] += reuse
        self.counters["prompt_tokens"] += len(prompt) - reuse

    def _step(self) -> None:
        """One prompt chunk (the oldest waiting request's) and the pending tokens of every decoding slot,
        in as many llama_decode calls as the batch plan needs."""
        plan = self.plan
        # while any student's task is here, background tasks wait (their cells stay)
        live = any(s.live for s in self.slots)
        running = [s for s in self.slots if (s.live if live else s.busy)]
        decoding = [s for s in running if s.pending and not s.in_prompt]
        waiting = sorted(
            (s for s in running if s.in_prompt),
            key=lambda s: s.task.submitted if s.task else 0.0,
        )
        prompt_part: list[tuple[_Slot, int]] = []
        if waiting:
            slot = waiting[0]
            self._catch_up(slot)
            rows = plan.prompt_rows(len(slot.pending), sum(len(s.pending) for s in decoding))
            prompt_part = [(slot, min(rows, self.rt.config.n_batch))]
            if self._chunk_makes_late(prompt_part[0][1], decoding):
                prompt_part = []
                self.counters["deferred_chunks"] += 1
        rows = [(s, len(s.pending)) for s in decoding]
        calls: list[list[tuple[_Slot, int]]]
        if prompt_part and plan.mixes(prompt_part[0][1], sum(n for _, n in rows)):
            calls = [prompt_part + rows]  # one call: cheaper than two
        else:
            calls = ([prompt_part] if prompt_part else []) + _pack(rows, plan.decode_rows)
        step_started = time.monotonic()
        self.counters["decode_steps"] += 1
        prompt_s = 0.0
        decode_rows = prompt_rows = 0
        for parts in calls:
            entries: list[tuple[int, int, int, bool]] = []
            owners: list[tuple[_Slot, int, int]] = []  # slot, first entry index, token count
            # in sequence order: with a cache stream per sequence llama.cpp computes a call in one
            # pass per run of consecutive sequence ids
            for slot, n in sorted(parts, key=lambda part: part[0].seq):
                base = len(slot.kv_tokens)
                owners.append((slot, len(entries), n))
                last = n == len(slot.pending)  # the slot's last pending row gives its logits
                for i in range(n):
                    entries.append((slot.pending[i], base + i, slot.seq, last and i == n - 1))
            in_prompt = sum(n for slot, n in parts if slot.in_prompt)
            started = time.monotonic()
            rc = self.rt.decode(entries)
            # no room left in the cache (llama.cpp changed nothing): parked prompts make room,
            # then paused background answers and what idle slots keep
            if rc == 1 and self._unpark_all():
                rc = self.rt.decode(entries)
            # every slot of this step is kept: a later call still decodes its pending rows
            if rc == 1 and self._forget_idle(keep=[slot for part in calls for slot, _ in part]):
                rc = self.rt.decode(entries)
            seconds = time.monotonic() - started
            if in_prompt:
                prompt_rows += in_prompt
                # the decode rows sharing the call cost about what they would alone
                decode_share = (
                    self.step_cost.predict(len(entries) - in_prompt) if len(entries) > in_prompt else 0
                )
                prompt_s += max(1e-3, seconds - decode_share)
            else:
                self.step_cost.observe(len(entries), seconds)
            decode_rows += len(entries) - in_prompt
            if rc == 1:
                # still full: the youngest task in the call gives its cells up, the others try
                # again next step (the oldest answers are the nearest to done)
                youngest = max(owners, key=lambda o: o[0].task.submitted if o[0].task else 0.0)[0]
                log.error(
                    "KV cache full for %d tokens: the youngest of %d tasks fails", len(entries), len(owners)
                )
                self._fail(youngest, "El modelo no pudo procesar la solicitud (memoria de contexto llena).")
                return
            if rc != 0:
                log.error("llama_decode returned %s for %d tokens", rc, len(entries))
                for slot, _, _ in owners:
                    self._fail(slot, "El modelo no pudo procesar la solicitud.")
                return
            for slot, first, n in owners:
                slot.kv_tokens.extend(slot.pending[:n])
                del slot.pending[:n]
                if not slot.pending:
                    self._sample(slot, first + n - 1)
        # a step of background work alone is no measure of a student's pace
        self._measure(time.monotonic() - step_started, decode_rows if live else 0, prompt_s, prompt_rows)

    def _reusable(self, source: _Slot, prompt: list[int]) -> int:
        """How much of prompt source's evaluated prompt cells can serve: the whole common prefix,
        but at least one prompt chunk's minimum is left to evaluate (the last token gives the
        first logits, and a shorter chunk would take another kernel)."""
        common = common_prefix(source.kv_tokens[: source.prompt_len], prompt)
        return max(0, min(common, len(prompt) - max(1, self.plan.prefill_min)))

    def _catch_up(self, slot: _Slot) -> None:
        """Share prompt cells another slot has evaluated since this one was admitted.

        Students who ask at the same moment often share passages: the oldest prompt is evaluated
        first, and the others copy the cells it has already computed instead of evaluating them
        again."""
        assert slot.task is not None
        base = len(slot.kv_tokens)
        best, src = base, None
        for other in self.slots + self.parked:
            if other is not slot and (common := self._reusable(other, slot.task.prompt)) > best:
                best, src = common, other
        if src is None:
            return
        if src in self.parked:  # as in _assign: a parked prompt in use is the last to evict
            src.last_used = time.monotonic()
        self.rt.seq_cp(src.seq, slot.seq, base, best)
        n = best - base
        slot.kv_tokens.extend(slot.pending[:n])
        del slot.pending[:n]
        slot.reused += n
        self.counters["reused_tokens"] += n
        self.counters["prompt_tokens"] -= n

    def _measure(self, step_s: float, decode_tokens: int, prompt_s: float, prompt_tokens: int) -> None:
        """Moving averages of the time between a streaming student's tokens and of prompt
        throughput, for admission and deadlines (decode calls are learned by StepCost)."""
        if decode_tokens:
            self.token_interval_s = 0.9 * self.token_interval_s + 0.1 * step_s
        if prompt_tokens >= 16:
            self.prefill_rate = 0.9 * self.prefill_rate + 0.1 * (prompt_tokens / max(1e-3, prompt_s))

    def _sample(self, slot: _Slot, batch_index: int) -> None:
        task = slot.task
        assert task is not None and slot.sampler is not None and slot.stream is not None
        try:
            token = slot.sampler.sample(self.rt.logits(batch_index), self._logit_bias(slot))
        except GrammarRejected:
            self._finish(slot, "stop")
            return
        if slot.first_token is None:
            slot.first_token = time.monotonic()
        slot.since_mark.append((token, slot.sampler.last_p))
        if self.rt.is_eog(token):
            self._finish(slot, "stop")
            return
        slot.sampler.accept(token)
        slot.new_tokens += 1
        self.counters["new_tokens"] += 1
        self._emit_text(slot, slot.stream.feed(self.rt.piece(token)))
        slot.pending = [token]
        if slot.new_tokens >= task.max_new_tokens:
            self._finish(slot, "length")
            return
        self._advance_phase(slot)

    def _chunk_makes_late(self, prompt_rows: int, decoding: list[_Slot]) -> bool:
        """Whether a step carrying `prompt_rows` of a newer prompt would leave a student's answer
        that is already writing too little time to end by its deadline: then this step decodes
        only, and the chunk waits. A chunk costs about as much as several decode-only steps, so in
        a busy class the answers admitted first would otherwise run out of time while newer
        prompts are evaluated: every timeout in three class runs came while writing, with the
        first word on time. Held back this way, timeouts and busy fallbacks both dropped; held
        back only once an answer's deadline had passed, timeouts stayed (BENCHMARKS.md, seventh
        round)."""
        chunk_s = self._prompt_s(prompt_rows)
        step_s = self.step_cost.predict(len(decoding))
        now = time.monotonic()
        for slot in decoding:
            task = slot.task
            deadline = task.deadline if task is not None else None  # once: see _spare_s
            if task is None or deadline is None or not slot.live:
                continue
            if self._spare_s(slot, task, deadline, step_s, now) < chunk_s:
                return True
        return False

    def _tokens_left(self, slot: _Slot) -> float:
        """How many more tokens this answer can take before its deadline, at the current pace."""
        task = slot.task
        deadline = task.deadline if task is not None else None  # once: see _spare_s
        if deadline is None:
            return float("inf")
        return (deadline - time.monotonic()) / max(self.token_interval_s, 1e-3)

    def _pressed(self, slot: _Slot) -> bool:
        """Near the deadline, a section ends at its next sentence end instead of at its budget.

        The explanation keeps room for a short recommendation. Time never cuts a sentence: a
        section first gets MIN_SECTION_TOKENS, and only whole sentences end early, so a class that
        got busier gets shorter complete answers (or, if even that is too late, the fallback)."""
        assert slot.task is not None
        if _written(slot) < MIN_SECTION_TOKENS:
            return False
        return self._tokens_left(slot) < _reserved(slot) + WRAP_UP_TOKENS

    def _logit_bias(self, slot: _Slot) -> dict[int, float] | None:
        """No new line before a section has its minimum; past its soft budget, or near the
        deadline, a nudge toward ending the sentence."""
        task = slot.task
        if task is None or not task.phases:
            return None
        phase = task.phases[slot.phase]
        used = slot.new_tokens - slot.phase_start_tokens
        pressed = self._pressed(slot)
        barred = self._barred(slot)
        # a section with nothing a student will read yet does not end by the model's choice
        hold_end = _held(phase, slot, pressed)
        if _written(slot) < MIN_SECTION_TOKENS:
            base = {**self._no_new_line, **self._no_end} if hold_end else self._no_new_line
            return {**base, **barred} if barred else base
        over = used - phase.soft_tokens
        if pressed:
            over = max(over, 4)
        bias = {t: min(8.0, 1.0 + 0.5 * over) for t in self._period_tokens} if over >= 0 else {}
        if hold_end:
            bias.update(self._no_end)
        bias.update(barred)
        return bias or None

    def _advance_phase(self, slot: _Slot) -> None:
        task = slot.task
        assert task is not None
        if not task.phases:
            return
        phase = task.phases[slot.phase]
        last = slot.phase == len(task.phases) - 1
        if phase.marker and phase.marker in slot.text[slot.phase_start_chars :]:
            self._enter_next_phase(slot)
            return
        used = slot.new_tokens - slot.phase_start_tokens
        at_sentence_end = _ends_sentence(slot.text)
        section = slot.text[slot.phase_start_chars :]
        overdue = self._tokens_left(slot) <= _reserved(slot)
        if overdue and _has_sentence(section) and not at_sentence_end:
            # out of time mid-sentence: close the section after its last whole sentence (the
            # answer's text drops the unfinished one) rather than let the student time out
            if last:
                self._finish(slot, "stop")
            elif self._force(slot, phase.transition):
                self._enter_next_phase(slot)
            return
        pressed = self._pressed(slot)
        newest = slot.text[slot.mark_chars :]
        passed_over = False
        # (only a space since the mark, as after a rewind, is no new sentence)
        if at_sentence_end and phase.keeps is not None and newest.strip():
            kept = phase.keeps(newest)
            if not kept and self._may_rewind(slot, phase, used, pressed):
                if phase.retries is None or phase.retries(newest):
                    self._rewind(slot)
                    return
                # left where it is (Phase.retries); where time presses and the section has
                # nothing to keep, the next sentence gets the time a retry would have had, and
                # counts as one
                if pressed and not slot.section_kept:
                    passed_over = True
                    slot.rewinds += 1
            slot.section_kept = slot.section_kept or kept
            self._mark(slot)
        # nothing in the section a student will read yet (every sentence would be withheld):
        # another sentence, within the hard budget, rather than an answer left to the summary
        wrap_up = (used >= phase.soft_tokens and not _held(phase, slot, pressed)) or pressed
        wrap_up = wrap_up and not passed_over
        if (wrap_up and at_sentence_end) or used >= phase.hard_tokens:
            if last:
                self._finish(slot, "stop" if at_sentence_end else "length")
                return
            forced = phase.transition if at_sentence_end else "." + phase.transition
            if self._force(slot, forced):
                self._enter_next_phase(slot)
            elif used >= phase.hard_tokens and not marker_overlap(section, phase.marker):
                # (unless the model is writing the marker: the grammar takes no forced transition
                # then, and the phase ends once the marker is whole)
                self._finish(slot, "length")
            # else the grammar does not take the transition yet (say, right after the leading
            # space): try again after the next token

    def _enter_next_phase(self, slot: _Slot) -> None:
        slot.phase = min(slot.phase + 1, len(slot.task.phases) - 1) if slot.task else 0
        slot.phase_start_tokens = slot.new_tokens
        slot.phase_start_chars = len(slot.text)
        slot.section_kept = False
        slot.phase_rewound = 0
        self._mark(slot)  # a sentence is never taken back into the section before

    def _mark(self, slot: _Slot) -> None:
        """The newest sentence begins here: remember what taking it back returns to. Called right
        after a sample (its token is pending) or a forced text (its tokens are), which the
        sampler has accepted."""
        assert slot.sampler is not None
        slot.mark_kv = len(slot.kv_tokens)
        slot.mark_pending = list(slot.pending)
        slot.mark_chars = len(slot.text)
        slot.since_mark, slot.barred = [], []
        slot.sampler.checkpoint()

    @staticmethod
    def _barred(slot: _Slot) -> dict[int, float]:
        """The choices a try taken back made, barred where the new try has come the same way."""
        if not slot.barred:
            return {}
        so_far = [token for token, _ in slot.since_mark]
        return {token: BARRED for before, token in slot.barred if before == so_far}

    def _may_rewind(self, slot: _Slot, phase: Phase, used: int, pressed: bool) -> bool:
        """Whether a sentence the phase's `keeps` rejected is taken back (_rewind), or, when it is
        not worth a retry (Phase.retries), passed over with a retry's time: not when no
        budget is left for another sentence (MIN_SECTION_TOKENS of its hard budget), when the
        answer has taken back its share, when the section ends at this sentence anyway (it
        already has a sentence to keep and is past its soft budget: the final check withholds the
        sentence then), or when time presses so that not even a short sentence fits before the
        deadline.

        Class runs: every `fallback-unsupported` answer left was a first question of the busy
        first minute, whose only sentence was rejected where time pressed (the section ends at
        its next sentence end then), with 3-6 s of its deadline left; taking it back under
        pressure too gives it one more sentence, and costs a failing answer that time."""
        # a retry needs room for a sentence: taken back at the answer's very start with only a few
        # tokens left, a retry that has written no letter by the section's hard budget leaves the
        # grammar where no transition is allowed, and the answer ends without its recommendation
        # (the likely path of a `fallback-error` seen once in a full test run)
        if slot.rewinds >= REWINDS_PER_ANSWER or phase.hard_tokens - used < MIN_SECTION_TOKENS:
            return False
        if slot.section_kept and used >= phase.soft_tokens:
            return False
        return not pressed or self._tokens_left(slot) >= REWIND_ROOM + _reserved(slot)

    def _rewind(self, slot: _Slot) -> None:
        """Take back the sentence just ended.

        Read in class runs: the small model's first sentence was often wrong the same way («El
        paciente está en estado de cirugía…»), and the next one, written after it, built on it.
        Taken back, the sentence's cells are dropped, the sampler returns to the mark, and the
        next try may not make the rejected sentence's least likely choice (where sampling took a
        chance) once it has come the same way up to it: barring its first token instead made
        most tries a sentence about nothing («Algunos datos del paciente son…»). Its tokens still
        count toward the budgets (they were computed), so a section never runs longer than it
        would have gone on writing."""
        assert slot.sampler is not None
        self.rt.seq_rm(slot.seq, slot.mark_kv, -1)
        del slot.kv_tokens[slot.mark_kv :]
        slot.pending = list(slot.mark_pending)
        slot.sampler.rewind()
        if slot.since_mark:
            tokens = [token for token, _ in slot.since_mark]
            weakest = min(range(len(tokens)), key=lambda i: slot.since_mark[i][1])
            slot.barred.append((tokens[:weakest], tokens[weakest]))
        self.counters["rewound_tokens"] += len(slot.since_mark)
        slot.phase_rewound += len(slot.since_mark)
        slot.since_mark = []
        slot.rewinds += 1
        self.counters["rewound_sentences"] += 1
        # the rejected sentence stays in the answer's text (the check withholds it there as it
        # did here); the next try is a sentence of its own after it
        self._emit_text(slot, " ")
        slot.mark_chars = len(slot.text)

    def _force(self, slot: _Slot, text: str) -> bool:
        """Write text for the model (checked against its grammar); it is decoded next step."""
        assert slot.sampler is not None and slot.stream is not None
        tokens = self.rt.tokenize(text, special=False)
        if not slot.sampler.allows_all(tokens):
            return False
        for token in tokens:
            slot.sampler.accept(token)
        slot.pending = slot.pending + tokens
        self._emit_text(slot, text)
        return True

    def _emit_text(self, slot: _Slot, text: str) -> None:
        if text and slot.task is not None:
            slot.text += text
            slot.task.sink(TextEvent(text))

    def _finish(self, slot: _Slot, finish: Literal["stop", "length", "cancelled", "preempted"]) -> None:
        task = slot.task
        if task is None:
            return
        if slot.stream is not None:
            self._emit_text(slot, slot.stream.flush())
        now = time.monotonic()
        if finish != "preempted":  # counted where it happens
            self.counters["cancelled" if finish == "cancelled" else "completed"] += 1
        event = DoneEvent(
            text=slot.text,
            finish=finish,
            prompt_tokens=len(task.prompt),
            reused_tokens=slot.reused,
            new_tokens=slot.new_tokens,
            queued_s=slot.started - task.submitted,
            first_token_s=(slot.first_token - task.submitted) if slot.first_token else None,
            total_s=now - task.submitted,
        )
        self._release(slot)
        task.sink(event)

    def _park(self, slot: _Slot) -> None:
        """Keep the prompt this slot evaluated in a parked sequence (its cells are shared, not
        copied), unless one already holds it; a prompt that extends a parked one replaces it."""
        n = min(slot.prompt_len, len(slot.kv_tokens))
        if not self.parked or n <= len(self._warm_prefix):
            return
        prompt = slot.kv_tokens[:n]
        now = time.monotonic()
        target = None
        for entry in self.parked:
            common = common_prefix(entry.kv_tokens, prompt)
            if common == n:  # already kept
                entry.last_used = now
                return
            if entry.kv_tokens and common == len(entry.kv_tokens):
                target = entry  # this prompt goes further
        if target is None:
            target = min(self.parked, key=lambda e: e.last_used)
        self.rt.seq_rm(target.seq, -1, -1)
        self.rt.seq_cp(slot.seq, target.seq, 0, n)
        target.kv_tokens, target.prompt_len, target.last_used = prompt, n, now

    def _unpark_all(self) -> bool:
        """Give up every parked prompt's cells (a full cache needs them more); whether any held some."""
        held = [entry for entry in self.parked if entry.kv_tokens]
        for entry in held:
            self._forget(entry)
            entry.last_used = 0.0
        if held:
            log.warning("KV cache full: %d parked prompts released", len(held))
        return bool(held)

    def _forget_idle(self, keep: list[_Slot]) -> bool:
        """Give up the cells of every slot but `keep`'s that no student waits on: background
        answers paused for a student in `keep` end "preempted", idle slots forget the prefixes they keep for
        reuse (and so do parked prompts, which the first two may have refilled). Whether any
        cells were released."""
        student_waits = any(slot.live for slot in keep)
        for slot in self.slots:
            if student_waits and slot.busy and not slot.live and slot not in keep:
                self._preempt(slot)
        idle = [slot for slot in self.slots if not slot.busy and slot.kv_tokens]
        for slot in idle:
            self._forget(slot)
        released = self._unpark_all() or bool(idle)
        if idle:
            log.warning("KV cache full: %d idle slots' cells released", len(idle))
        return released

    def _preempt(self, slot: _Slot) -> bool:
        """End a background task so that its slot can serve a student; not one a student has joined
        meanwhile (GenerationTask.yield_slot). Whether the slot was freed."""
        task = slot.task
        if task is None or not task.yield_slot():
            return False
        self.counters["preempted"] += 1
        self._finish(slot, "preempted")
        return True

    def _forget(self, slot: _Slot) -> None:
        """Drop every cell of the slot's (or parked prompt's) sequence, and the books of them."""
        self.rt.seq_rm(slot.seq, -1, -1)
        slot.kv_tokens, slot.prompt_len = [], 0

    def _fail(self, slot: _Slot, message: str) -> None:
        task = slot.task
        self.counters["errors"] += 1
        self._forget(slot)  # the sequence's KV may be half-written
        self._release(slot)
        if task is not None:
            task.sink(ErrorEvent(message))

    def _release(self, slot: _Slot) -> None:
        self._park(slot)
        if slot.sampler is not None:
            slot.sampler.close()
        slot.task = None
        slot.sampler = None
        slot.stream = None
        slot.pending = []
        slot.last_used = time.monotonic()
