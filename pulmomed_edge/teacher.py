"""The teacher: simulation state → grounded Spanish answer.

cache → retrieve → prompt → generate (shared by identical concurrent requests) → sections →
grounding check (sentences no source supports are withheld, also from the stream) → response,
with a grounded extractive fallback for every way generation can fail. The event loop
only awaits: retrieval and tokenisation run in a worker thread, generation in the engine's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .activity import BUSY_KINDS, CACHE, UNSUPPORTED, RecentAnswers, answer_kind
from .cache import ResponseCache
from .canonical import CanonicalState, cache_key, canonicalize, patient_stage, retrieval_queries
from .cases import CaseLibrary, LibraryCase
from .engine import (
    DoneEvent,
    EngineBusy,
    EngineStopped,
    ErrorEvent,
    GenerationBackend,
    GenerationTask,
    Phase,
    SamplingParams,
    TextEvent,
)
from .engine.chat import ChatTemplate
from .engine.scheduler import common_prefix
from .extractive import extractive_sections
from .grounding import SentenceGate, ground_sections, keeps_a_sentence, support_of, worth_retrying
from .prompts import (
    ANSWER_GRAMMAR,
    EXPLANATION_GRAMMAR,
    SECTION_MARKER,
    SYSTEM_PROMPT,
    PromptPassage,
    Sections,
    SectionTracker,
    complete_sentences,
    patient_line,
    render_prompt,
    split_sections,
    user_message,
    with_citation_numbers,
)
from .schema import SectionOrigin, SimulationState, TeacherResponse

log = logging.getLogger(__name__)

PREPARED_MEMO_SIZE = 512
DELIVERY_MARGIN_S = 0.25  # of the budget, kept for sending the answer
ANSWER_SHARE = 0.8  # of the budget: by then the engine ends the answer at a sentence (the rest
# is slack for the sentence being written: at 2-3 students per step a token takes ~0.1 s)
MIN_ANSWER_TOKENS = 96  # admitted answers shrink to fit the budget, never below this
# (nor above the configured max_new_tokens)
# a request is admitted when about this many tokens fit its budget at the current pace; the
# engine's deadline then ends the answer at a sentence if the class gets busier meanwhile
ADMIT_MIN_TOKENS = 64
# Backfill: a state that got "fallback-busy"/"fallback-timeout" is generated later, in the
# engine's spare steps, so the student who asks it again gets the model's answer from the cache.
# A background generation computes only while no student's generation needs the engine: it
# pauses (keeping its cells) when one arrives and goes on in the next pause of the class.
BACKFILL_POLL_S = 1.0
BACKFILL_QUIET_S = 1.0  # no new live generation for this long before a backfill starts
BACKFILL_AT_ONCE = 2  # background generations at once (each holds a slot while it pauses)
BACKFILL_ATTEMPTS = 2  # per state; a failed backfill is retried once (a preempted one is not a try)
BACKFILL_PENDING_MAX = 64  # states remembered, newest first
# a state whose answer was withheld whole: how many more draws it gets in all (the backfill's and
# those of students who ask it again), and how many such states are remembered
STAND_IN_DRAWS = 4
STAND_IN_STATES_MAX = 256
BACKFILL_MAX_AGE_S = 600.0  # older states are dropped: the class has moved on
# nobody waits on a backfill and it may pause for long in a busy class: this only guards
# against a generation that never ends
BACKFILL_TIMEOUT_S = BACKFILL_MAX_AGE_S


class PassageLike(Protocol):
    id: str
    fuente: str
    temas: tuple[str, ...]
    texto: str


class HitLike(Protocol):
    passage: PassageLike
    grounded: bool


class SearchFn(Protocol):
    def __call__(self, query: str, k: int) -> list[HitLike]: ...


@dataclass
class LanguageModel:
    """A loaded LLM as the teacher sees it: its identity, its engine and its prompt format."""

    name: str
    sha256: str
    engine: GenerationBackend  # the in-process GenerationEngine today (engine/backend.py)
    template: ChatTemplate
    tokenize: Callable[[str], list[int]]
    added: bool = False  # registered by the lab (`models add`), not one of the pinned models


@dataclass(frozen=True)
class Prepared:
    state: CanonicalState
    case: LibraryCase | None
    passages: list[PassageLike]  # most important first; cited by their source's place (citation_numbers)
    key: str
    prompt: list[int] | None  # None when no LLM is loaded
    # the terms the model is shown: what its sentences may claim (grounding.py; empty without LLM)
    support: frozenset[str] = frozenset()
    # the patient line's: a sentence made of these alone is withheld (grounding.py)
    patient: frozenset[str] | None = None

    @property
    def stage(self) -> str:
        """The patient's stage, which the answer may not contradict (in the case's passage or,
        from the tumour volume, in the prompt; user_message)."""
        return patient_stage(self.state, self.case)


@dataclass
class Flight:
    """One generation that every identical concurrent request shares."""

    prepared: Prepared
    deltas: list[tuple[str, str]] = field(default_factory=list)
    listeners: list[asyncio.Queue[tuple[str, Any]]] = field(default_factory=list)
    members: int = 0
    cancel: Callable[[], None] | None = None
    result: asyncio.Future[TeacherResponse] | None = None
    runner: asyncio.Task[None] | None = None
    backfill: bool = False  # started by the backfill with nobody asking (stays so once joined)
    # the draw this is of its state (_draw): 0 for a student's first request, then 1, 2… for the
    # backfill's tries and students' redraws of a summary that stands in (_redraw)
    attempt: int = 0
    preempted: bool = False  # a backfill that gave its slot to a student, or stopped unsubmitted
    created: float = 0.0  # time.monotonic() when it started: its budget runs from here
    task: GenerationTask | None = None  # once submitted to the engine
    joined_by: float | None = None  # a backfill a student joined: the deadline it now has
    # every student left a student's generation: it is cancelled, and nobody may join it
    abandoned: bool = False
    # admission gave it fewer new tokens than configured (a busy engine): an answer whose every
    # sentence was withheld may then be a matter of length, which a later try in full can beat
    shortened: bool = False
    # a redraw of a state whose summary stands in (TeacherService._redraw): a busy engine's
    # student gets it at once instead of `fallback-busy`
    stand_in: TeacherResponse | None = None

    def promote(self, deadline: float) -> bool:
        """A student joins this flight. A backfill from now on runs as their generation, and wraps
        up by their deadline (the earliest joiner's). False when it cannot be joined: the engine
        gave its slot to another student this very instant (it ends "preempted")."""
        if not self.backfill or self.joined_by is not None:
            return True
        if self.task is not None and not self.task.promote(deadline):
            return False
        self.joined_by = deadline  # read by _generate when the task is not submitted yet
        return True

    def demote(self) -> None:
        """Every student who joined this backfill left: it goes on for the cache in the steps
        students leave free, as before they came."""
        if not self.backfill or self.joined_by is None:
            return
        self.joined_by = None
        if self.task is not None:
            self.task.demote()

    def publish(self, kind: str, data: Any) -> None:
        if kind == "delta":
            self.deltas.append(data)
        for queue in self.listeners:
            queue.put_nowait((kind, data))


@dataclass(frozen=True)
class TeacherConfig:
    budget_s: float = 15.0
    max_new_tokens: int = 200
    top_k_passages: int = 3
    max_prompt_tokens: int = 768
    # a request whose first token is not expected within this share of the budget, or that could
    # not write a minimal answer in time, gets the grounded fallback at once ("fallback-busy")
    # instead of timing out later; inf turns admission off
    admit_share: float = 0.8
    sampling: SamplingParams = field(default_factory=SamplingParams)
    backfill: bool = True  # generate busy spells' fallback states later, when the engine is idle
    grounding: bool = True  # withhold the model's sentences the sources do not support
    stream_sentences: bool = True  # with grounding: stream whole checked sentences only
    # the model writes the explanation only; the recommendation is the sources' own sentence
    # (Settings.recommendation: the pinned small models' recommendations were not to be trusted)
    recommendation_from_sources: bool = False

    @property
    def checked_stream(self) -> bool:
        """Whether students are streamed only whole sentences that passed the grounding check."""
        return self.grounding and self.stream_sentences


class TeacherService:
    def __init__(
        self,
        *,
        library: CaseLibrary,
        search: SearchFn,
        index_id: str,
        cache: ResponseCache[TeacherResponse],
        config: TeacherConfig,
        llm: LanguageModel | None = None,
        llm_failure: str | None = None,
    ) -> None:
        self.library = library
        self.search = search
        self.index_id = index_id
        self.cache = cache
        self.config = config
        self.llm = llm
        self.llm_failure = llm_failure
        self._flights: dict[str, Flight] = {}
        self.recent = RecentAnswers()  # what students got lately, for the status page
        # canonical state → its retrieval and prompt: the same buckets always give the same ones
        self._memo: OrderedDict[str, Prepared] = OrderedDict()
        self._memo_lock = threading.Lock()
        # cache key → (state, attempts so far, when it was missed): newest last
        self._missed: OrderedDict[str, tuple[Prepared, int, float]] = OrderedDict()
        # cache key → the newest draw (Flight.attempt) of a state whose summary stands in
        self._draws: OrderedDict[str, int] = OrderedDict()
        self._last_live = -math.inf  # when the last live generation started (monotonic)
        self._backfiller: asyncio.Task[None] | None = None
        self.backfill_started = 0  # background generations started (preempted ones included)
        self.backfilled = 0  # the model's answers generated in the background and cached
        # model answers checked against their sources; those trimmed; sentences withheld
        self.grounding = {"answers": 0, "trimmed": 0, "sentences": 0}
        # answers that ran out of budget: before their first word (admission misjudged the wait),
        # while writing (the steps got slower than the deadline allowed for), or a backfill a
        # student joined that could not finish in their budget
        self.timeouts = {"waiting": 0, "writing": 0, "joined": 0}
        # students answered "fallback-busy" at once, by why: the first word would come too late,
        # too few tokens would fit the budget, the answers already running would miss theirs, or
        # the engine's queue was full
        self.busy = {"late": 0, "short": 0, "crowds": 0, "queue": 0}

    # --- preparation (worker thread) -------------------------------------------------------
    def retrieve(self, state: CanonicalState, case: LibraryCase | None) -> list[PassageLike]:
        """The best grounded passage for each of the most important aspects of the state, most
        important first (retrieval_queries' order, which is also the prompt's)."""
        chosen: list[PassageLike] = []
        seen: set[str] = set()
        for query in retrieval_queries(state, case):
            if len(chosen) >= self.config.top_k_passages:
                break
            for hit in self.search(query, 4):
                if hit.grounded and hit.passage.id not in seen and _fits(hit.passage, case):
                    chosen.append(hit.passage)
                    seen.add(hit.passage.id)
                    break
        return chosen

    def prepared_if_known(self, state: SimulationState) -> Prepared | None:
        """A state whose buckets were prepared before needs no retrieval or tokenising again."""
        material = canonicalize(state).key_material()
        with self._memo_lock:
            prepared = self._memo.get(material)
            if prepared is not None:
                self._memo.move_to_end(material)
            return prepared

    def prepare(self, state: SimulationState) -> Prepared:
        """Retrieve, fit the prompt and derive the cache key (worker thread; memoised)."""
        canon = canonicalize(state)
        prepared = self._prepare(canon)
        with self._memo_lock:
            self._memo[canon.key_material()] = prepared
            while len(self._memo) > PREPARED_MEMO_SIZE:
                self._memo.popitem(last=False)
        return prepared

    def _prepare(self, canon: CanonicalState) -> Prepared:
        case = self.library.get(canon.case_id)
        passages = self.retrieve(canon, case)
        llm = self.llm
        prompt = None
        support: frozenset[str] = frozenset()
        patient: frozenset[str] | None = None
        if llm is not None:
            passages, prompt = self._fit_prompt(canon, case, passages)
            support = _support(canon, case, passages)
            patient = support_of([patient_line(canon, case)])
        key = cache_key(canon, [p.id for p in passages], llm.sha256 if llm else "-", self.index_id)
        return Prepared(canon, case, passages, key, prompt, support, patient)

    def _fit_prompt(
        self, canon: CanonicalState, case: LibraryCase | None, passages: list[PassageLike]
    ) -> tuple[list[PassageLike], list[int]]:
        """The prompt's tokens, dropping the least important passages until it fits."""
        assert self.llm is not None
        while True:
            tokens = self.llm.tokenize(render_prompt(self.llm.template, canon, case, passages))
            if len(tokens) <= self.config.max_prompt_tokens or not passages:
                return passages, tokens
            passages = passages[:-1]

    def warm_prefix(self) -> list[int]:
        """The tokens every prompt starts with (system part): evaluated once by the engine."""
        if self.llm is None:
            return []
        return system_prefix(self.llm.template, self.llm.tokenize)

    # --- answering (event loop) -------------------------------------------------------------
    async def answer(self, state: SimulationState) -> TeacherResponse:
        final: TeacherResponse | None = None
        async for kind, data in self.stream(state):
            if kind == "done":
                final = data
        assert final is not None
        return final

    async def stream(self, state: SimulationState) -> AsyncIterator[tuple[str, Any]]:
        """Events: ("meta", dict), ("delta", {"seccion", "texto"})…, ("done", TeacherResponse)."""
        started = time.perf_counter()
        prepared = self.prepared_if_known(state) or await asyncio.to_thread(self.prepare, state)
        model_name = self.llm.name if self.llm and not self._engine_down() else "fallback-unavailable"
        meta = {
            "estadio": prepared.stage,
            "fuentes": _sources(prepared.passages),
            "retrieved_chunks": len(prepared.passages),
            "llm_model": model_name,
        }
        # a summary that stands in for an answer withheld whole is drawn again for a student who
        # asks (while the state has draws left): they get it at once only if the engine is busy
        stand_in = self.cache.peek(prepared.key)
        attempt = self._redraw(prepared.key, stand_in)
        if attempt is None:
            cached = self.cache.get(prepared.key)
            if cached is not None:
                yield "meta", meta
                self.recent.record(CACHE)
                yield "done", _timed(cached, started, "hit")
                return
            stand_in, attempt = None, 0
        flight = self._flights.get(prepared.key)
        role = "shared"
        # a preempted backfill ends with a fallback: not that; nor, with the engine stuck, a
        # backfill that would keep the student for their whole budget; a backfill of this very
        # state otherwise now answers this student (unless its slot went to another this instant)
        if (
            flight is None
            or flight.preempted
            or (flight.backfill and self._engine_down())
            or not flight.promote(time.monotonic() + ANSWER_SHARE * self.config.budget_s)
        ):
            self._last_live = time.monotonic()
            flight = self._launch(prepared, attempt=attempt, stand_in=stand_in)
            role = "miss"
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        flight.listeners.append(queue)
        # what was written before this student joined, taken with no await in between: a
        # sentence published while "meta" is sent goes to the queue only, never to both
        replay = list(flight.deltas)
        flight.members += 1
        getter: asyncio.Future[tuple[str, Any]] | None = None
        try:
            yield "meta", meta
            for seccion, texto in replay:
                yield "delta", {"seccion": seccion, "texto": texto}
            assert flight.result is not None
            # a backfill may run past this student's budget: then the student gets the fallback
            # and the backfill goes on for the cache
            give_up = time.monotonic() + self.config.budget_s - DELIVERY_MARGIN_S
            while not flight.result.done():
                getter = asyncio.ensure_future(queue.get())
                wait = max(0.0, give_up - time.monotonic()) if flight.backfill else None
                await asyncio.wait({getter, flight.result}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if not flight.result.done() and flight.backfill and time.monotonic() >= give_up:
                        break
                    continue
                kind, data = getter.result()
                if kind == "delta":
                    yield "delta", {"seccion": data[0], "texto": data[1]}
            while not queue.empty():  # deltas that raced the result
                kind, data = queue.get_nowait()
                if kind == "delta":
                    yield "delta", {"seccion": data[0], "texto": data[1]}
            if flight.result.done():
                response = flight.result.result()
            else:
                self.timeouts["joined"] += 1
                response = self._keeping_shown(flight, "fallback-timeout")
            if response is flight.stand_in:  # the engine was busy: the cache's answer, at once
                role = "hit"
            self.recent.record(CACHE if role == "hit" else answer_kind(response.llm_model))
            yield "done", _timed(response, started, role)
        finally:
            if getter is not None:  # the student left while waiting: no queue read outlives them
                getter.cancel()
            flight.listeners.remove(queue)
            flight.members -= 1
            if flight.members == 0 and not flight.result.done():
                if flight.backfill:
                    flight.demote()
                else:  # nobody is listening any more: free the slot, and let nobody join it
                    flight.abandoned = True
                    if self._flights.get(prepared.key) is flight:
                        del self._flights[prepared.key]
                    if flight.cancel:
                        flight.cancel()

    def _launch(
        self,
        prepared: Prepared,
        *,
        backfill: bool = False,
        attempt: int = 0,
        stand_in: TeacherResponse | None = None,
    ) -> Flight:
        """Register a flight for this state (identical requests join it) and start generating."""
        flight = Flight(
            prepared, backfill=backfill, attempt=attempt, created=time.monotonic(), stand_in=stand_in
        )
        flight.result = asyncio.get_running_loop().create_future()
        self._flights[prepared.key] = flight
        flight.runner = asyncio.create_task(self._fly(flight))
        return flight

    async def _fly(self, flight: Flight) -> None:
        assert flight.result is not None
        try:
            response = await self._generate(flight)
            flight.result.set_result(response)
            self._settle(flight, response)
        except Exception:  # never leave joiners hanging
            log.exception("generation flight failed")
            if flight.task is not None:
                flight.task.cancel.set()  # nobody will read what it writes
            if not flight.result.done():
                try:  # what the students were already shown stays
                    response = self._keeping_shown(flight, "fallback-error")
                except Exception:
                    log.exception("no fallback keeping what was shown")
                    response = self._fallback(flight.prepared, "fallback-error")
                flight.result.set_result(response)
        finally:
            if self._flights.get(flight.prepared.key) is flight:
                del self._flights[flight.prepared.key]

    def _settle(self, flight: Flight, response: TeacherResponse) -> None:
        """What a flight's answer leaves behind: a cache entry, and a state for the backfill."""
        key = flight.prepared.key
        if response is flight.stand_in:  # no draw: the engine was too busy for one
            return
        if response.llm_model == UNSUPPORTED:
            self._draws[key] = max(flight.attempt, self._draws.pop(key, 0))
            while len(self._draws) > STAND_IN_STATES_MAX:
                self._draws.popitem(last=False)
        if _keeps_in_cache(response.llm_model, flight):
            self.cache.put(key, response)
            self._missed.pop(key, None)
            if response.llm_model != UNSUPPORTED:
                self._draws.pop(key, None)
                if flight.backfill:  # the status page's "listas": the model's answers only
                    self.backfilled += 1
        # an answer withheld whole is tried again in the background, another draw each try
        # (_draw): the cached summary stands in until a try writes a sentence to keep
        if (response.llm_model in BUSY_KINDS or response.llm_model == UNSUPPORTED) and not flight.abandoned:
            self._remember_miss(flight)

    def _redraw(self, key: str, cached: TeacherResponse | None) -> int | None:
        """The draw (Flight.attempt) a student's request makes of a state whose cached answer is
        the summary standing in for one withheld whole; None to serve the cached answer.

        Class runs: a third of the `fallback-unsupported` answers were cache hits of such a
        summary, read again while the backfill waited for a quiet engine. A student who asks
        such a state now gets another draw (the backfill's tries and theirs count together, up
        to STAND_IN_DRAWS), or the summary at once when admission finds the engine busy."""
        if cached is None or cached.llm_model != UNSUPPORTED or self.llm is None or self._engine_down():
            return None
        draws = self._draws.get(key, 0)
        return draws + 1 if draws < STAND_IN_DRAWS else None

    # --- backfill (event loop) ----------------------------------------------------------------
    def start_backfill(self) -> None:
        """Start the background loop (composition root, once the engine runs)."""
        # a backfill's only use is the cache entry it leaves
        if self.config.backfill and self.llm is not None and self.cache.size > 0 and self._backfiller is None:
            self._backfiller = asyncio.create_task(self._backfill_loop(), name="backfill")

    async def close(self) -> None:
        """Stop the backfill loop and cancel background generations (shutdown)."""
        if self._backfiller is not None:
            self._backfiller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backfiller
            self._backfiller = None
        self._cancel_backfills()

    def backfill_stats(self) -> dict[str, int]:
        running = sum(1 for f in self._flights.values() if f.backfill)
        return {
            "pending": len(self._missed),
            "running": running,
            "started": self.backfill_started,
            "answered": self.backfilled,
        }

    def _engine_down(self) -> bool:
        """The engine cannot answer now: stopped, failed or stuck in one pass (health says so)."""
        if self.llm is None:
            return False
        engine = self.llm.engine
        return not engine.running or engine.stalled_s() > 0

    def _remember_miss(self, flight: Flight) -> None:
        # a student's own miss is always remembered (attempt 0); a preempted try does not count
        attempts = flight.attempt - flight.preempted
        key = flight.prepared.key
        # this try supersedes what was pending for the state: left there, a state whose newer
        # draw (a student's, _redraw) had used up the tries was tried again with an older count,
        # and so with a seed already drawn
        self._missed.pop(key, None)
        if not self.config.backfill or attempts >= BACKFILL_ATTEMPTS:
            return
        self._missed[key] = (flight.prepared, attempts, time.monotonic())
        while len(self._missed) > BACKFILL_PENDING_MAX:
            self._missed.popitem(last=False)

    async def _backfill_loop(self) -> None:
        while True:
            await asyncio.sleep(BACKFILL_POLL_S)
            try:
                self._backfill_step()
            except Exception:  # the loop must outlive any one state's trouble
                log.exception("backfill step failed")

    def _backfill_step(self) -> None:
        """Start background generations for missed states; they wait in their slots while
        students' generations run and compute in the steps those leave free."""
        now = time.monotonic()
        if not self._missed or now - self._last_live < BACKFILL_QUIET_S or self._engine_down():
            return  # a stuck engine would turn each state into a fallback and forget it
        running = [f for f in self._flights.values() if f.backfill]
        while self._missed and len(running) < BACKFILL_AT_ONCE:
            key, (prepared, attempts, missed_at) = self._missed.popitem(last=True)
            if now - missed_at > BACKFILL_MAX_AGE_S:
                self._missed.clear()  # everything older is older still
                return
            cached = self.cache.peek(key)
            if key in self._flights or (cached is not None and cached.llm_model != UNSUPPORTED):
                continue
            running.append(self._launch(prepared, backfill=True, attempt=attempts + 1))
            self.backfill_started += 1

    def _cancel_backfills(self) -> None:
        """Cancel running backfills (shutdown)."""
        for flight in list(self._flights.values()):
            if flight.backfill and not flight.preempted:
                flight.preempted = True  # one not yet submitted stops before it is
                if flight.cancel is not None:
                    flight.cancel()

    async def _generate(self, flight: Flight) -> TeacherResponse:
        prepared = flight.prepared
        llm = self.llm
        if llm is None or prepared.prompt is None:
            return self._fallback(prepared, "fallback-unavailable")
        if not prepared.passages:
            return self._fallback(prepared, "fallback-no-grounding")
        loop = asyncio.get_running_loop()
        engine = llm.engine
        if engine.stalled_s():  # stuck (health says so): a question would only wait out its budget
            return self._fallback(prepared, "fallback-unavailable")
        # nobody waits on a backfill: it writes in full, in steps no student needs (unless a
        # student joins it: then it wraps up by their deadline)
        max_new, budget_s = self.config.max_new_tokens, BACKFILL_TIMEOUT_S
        deadline_s: float | None = flight.joined_by
        first_token_s = 0.0
        if not flight.backfill:
            budget_s = self.config.budget_s
            # the prompt work is what no slot or parked prompt already holds
            new_tokens = engine.new_prompt_tokens(prepared.prompt)
            first_token_s, per_token_s = engine.estimate(new_tokens)
            # as many tokens as fit in what is left of the budget, never more than configured
            left_s = ANSWER_SHARE * budget_s - (time.monotonic() - flight.created)
            affordable = int((left_s - first_token_s) / max(per_token_s, 1e-3))
            late = first_token_s > self.config.admit_share * budget_s
            # the fewest tokens worth starting for: with the recommendation from the sources the
            # model writes the explanation alone, the explanation's share of them (answer_budget)
            least = ADMIT_MIN_TOKENS
            if self.config.recommendation_from_sources:
                least = answer_budget(ADMIT_MIN_TOKENS, explanation_only=True)["max_new_tokens"]
            short = math.isfinite(self.config.admit_share) and affordable < least
            # nor may a new student make the answers already running miss their budget (they wrap
            # up from ANSWER_SHARE of it; what matters is the budget itself)
            grace_s = (1 - ANSWER_SHARE) * budget_s - DELIVERY_MARGIN_S
            # an idle engine always takes the request: estimates from a busy spell must not lock
            # it out
            if not engine.idle:
                crowds = not (late or short) and engine.crowds(new_tokens, grace_s)
                reason = "late" if late else "short" if short else "crowds" if crowds else None
                if reason:
                    log.info(
                        "busy (%s): first word expected after %.1f s, %d tokens would fit; engine: %s",
                        reason,
                        first_token_s,
                        affordable,
                        engine.stats(),
                    )
                    return self._busy(flight, reason)  # it could not finish in time anyway
            max_new = min(max_new, max(MIN_ANSWER_TOKENS, affordable))
            flight.shortened = max_new < self.config.max_new_tokens
            # the engine wraps the answer up before the budget rather than letting it time out
            deadline_s = flight.created + ANSWER_SHARE * budget_s
        events: asyncio.Queue[Any] = asyncio.Queue()
        task = GenerationTask(
            prompt=prepared.prompt,
            sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            grammar=EXPLANATION_GRAMMAR if self.config.recommendation_from_sources else ANSWER_GRAMMAR,
            params=_draw(self.config.sampling, flight.attempt),
            deadline=deadline_s,
            background=flight.backfill and flight.joined_by is None,
            **answer_budget(
                max_new, explanation_only=self.config.recommendation_from_sources, **self._checks(prepared)
            ),
        )
        flight.cancel = task.cancel.set
        flight.task = task
        if flight.preempted:  # shut down before this backfill reached the engine
            return self._fallback(prepared, "fallback-busy")
        if flight.abandoned:  # every student left before it reached the engine
            return self._fallback(prepared, "fallback-timeout")
        try:
            llm.engine.submit(task)
        except EngineBusy:
            return self._busy(flight, "queue")
        except EngineStopped:
            return self._fallback(prepared, "fallback-unavailable")
        except ValueError:
            log.exception("prompt does not fit the slot")
            return self._fallback(prepared, "fallback-error")
        tracker = SectionTracker()
        # with the grounding check on, students get whole checked sentences: never one that the
        # final answer then takes back
        gate = (
            SentenceGate(prepared.support, prepared.stage, patient=prepared.patient)
            if self.config.checked_stream
            else None
        )
        # the fallback must reach the student within the budget, not just leave this coroutine
        deadline = flight.created + budget_s - DELIVERY_MARGIN_S
        first_text: float | None = None
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                task.cancel.set()  # the worker frees the slot at its next step
                if flight.backfill:  # joiners gave up by their own budget (timeouts["joined"])
                    log.info("background answer out of time after %.0f s: dropped", budget_s)
                else:
                    self._note_timeout(flight, first_token_s, first_text)
                return self._keeping_shown(flight, "fallback-timeout")
            if isinstance(event, TextEvent):
                if first_text is None:
                    first_text = time.monotonic() - flight.created
                for section, text in tracker.feed(event.text):
                    for delta in gate.feed(section, text) if gate else [(section, text)]:
                        flight.publish("delta", delta)
            elif isinstance(event, ErrorEvent):
                # a shutdown ends the answers still writing: expected, unlike a failure
                shutdown = engine.failure is None and not engine.running
                log.log(logging.WARNING if shutdown else logging.ERROR, "generation error: %s", event.message)
                return self._keeping_shown(flight, "fallback-error")
            elif isinstance(event, DoneEvent):
                if event.finish == "preempted":  # a student needed the backfill's slot
                    flight.preempted = True
                    return self._fallback(prepared, "fallback-busy")
                if event.finish == "cancelled":
                    return self._keeping_shown(flight, "fallback-timeout")
                sections = self._sections(event.text)
                if sections is None:
                    log.error(
                        "generation without an explanation (finish %s, %d new tokens): %r",
                        event.finish,
                        event.new_tokens,
                        event.text[:200],
                    )
                    return self._keeping_shown(flight, "fallback-error")
                for delta in gate.finish() if gate else []:
                    flight.publish("delta", delta)
                response = self._checked(prepared, sections, llm.name)
                if not sections.recomendacion:  # the sources' own: streamed like the model's would be
                    flight.publish("delta", ("recomendacion", response.recomendacion))
                return response

    def _busy(self, flight: Flight, reason: str) -> TeacherResponse:
        """What a request the engine is too busy for gets at once: the summary the cache held for
        a redraw (no draw spent), else `fallback-busy`, counted by why for a student's request."""
        if flight.stand_in is not None:
            return flight.stand_in
        if not flight.backfill:
            self.busy[reason] += 1
        return self._fallback(flight.prepared, "fallback-busy")

    def _sections(self, generated: str) -> Sections | None:
        """The generated sections; with the recommendation from the sources, the model wrote the
        explanation alone (the recommendation is left empty for the summary's to fill).

        An answer that ended before its recommendation keeps its explanation, and the summary's
        recommendation completes it (`origen` says so): once in a full test run the test model's
        answer, with max_new_tokens 40, ended without its recommendation, and the student got
        `fallback-error` for it (the likely path is closed in the engine: _may_rewind)."""
        if self.config.recommendation_from_sources:
            return Sections(complete_sentences(generated.strip()), "")
        sections = split_sections(generated)
        if sections is None:
            explanation = complete_sentences(generated.partition(SECTION_MARKER)[0].strip())
            if not explanation:
                return None
            log.warning("answer without its recommendation: the sources' completes it: %r", generated[:200])
            sections = Sections(explanation, "")
        return sections

    def _checked(self, prepared: Prepared, sections: Sections, model: str) -> TeacherResponse:
        """The model's answer without the sentences its sources do not support; a section left
        with none is the grounded summary's (and `origen` says so)."""
        summary = self._extractive(prepared)
        if not self.config.grounding:
            final, origin = _completed(sections, summary)
            return self._response(prepared, final, model, origin)
        grounded = ground_sections(
            sections, prepared.support, summary, stage=prepared.stage, patient=prepared.patient
        )
        self.grounding["answers"] += 1
        if grounded.withheld:
            self.grounding["trimmed"] += 1
            self.grounding["sentences"] += len(grounded.withheld)
            log.info("withheld %d unsupported sentence(s): %s", len(grounded.withheld), grounded.withheld)
        if not grounded.kept:
            # every sentence was withheld (or said nothing): the student reads the extractive summary, and the
            # answer says so (API: "fallback-…" when the model did not write it)
            model = UNSUPPORTED
        response = self._response(prepared, grounded.sections, model, _origin(grounded.filled))
        return response.model_copy(update={"frases_retiradas": len(grounded.withheld)})

    def _checks(self, prepared: Prepared) -> dict[str, Callable[[str], bool]]:
        """The check each sentence the model writes must pass (Phase.keeps): one that would be
        withheld is taken back and written again when it is worth it (Phase.retries), and a
        section with none to keep writes another, so that fewer answers are the summary's
        (`fallback-unsupported`); none with the grounding check off."""
        if not self.config.grounding:
            return {}
        support, stage, patient = prepared.support, prepared.stage, prepared.patient
        return {
            "keeps": lambda text: keeps_a_sentence(text, support, stage=stage, patient=patient),
            "retries": lambda text: worth_retrying(text, support, stage=stage, patient=patient),
        }

    def _extractive(self, prepared: Prepared) -> Sections:
        numbered = [(n, p.texto) for n, p in with_citation_numbers(prepared.passages)]
        return extractive_sections(prepared.state, numbered, prepared.case.estadio if prepared.case else None)

    def _fallback(self, prepared: Prepared, reason: str) -> TeacherResponse:
        return self._response(prepared, self._extractive(prepared), reason, FROM_SOURCES)

    def _note_timeout(self, flight: Flight, predicted_s: float, first_text: float | None) -> None:
        """Count an answer that ran out of budget, and log what admission expected of it."""
        stage = "waiting" if first_text is None else "writing"
        self.timeouts[stage] += 1
        engine = self.llm.engine if self.llm else None
        log.warning(
            "answer out of time (%s): first word expected after %.1f s, %s; engine now: %s",
            stage,
            predicted_s,
            "none written" if first_text is None else f"first written after {first_text:.1f} s",
            engine.stats() if engine else "-",
        )

    def _keeping_shown(self, flight: Flight, label: str) -> TeacherResponse:
        """The fallback for an answer that ran out of time or broke off, keeping what its students
        were already shown: with the sentence stream, those are whole sentences that passed the
        check, so `done` never takes back a sentence a headset displayed; a section with none is
        the grounded summary's. (Streamed pieces of words are not kept: `done` replaces them, as it
        always has.)"""
        fallback = self._extractive(flight.prepared)
        if not self.config.checked_stream or not flight.deltas:
            return self._response(flight.prepared, fallback, label, FROM_SOURCES)
        shown = {"explicacion": "", "recomendacion": ""}
        for seccion, texto in flight.deltas:
            shown[seccion] += texto
        sections, origin = _completed(Sections(shown["explicacion"], shown["recomendacion"]), fallback)
        return self._response(flight.prepared, sections, label, origin)

    def _response(
        self, prepared: Prepared, sections: Sections, model: str, origin: SectionOrigin
    ) -> TeacherResponse:
        return TeacherResponse(
            explicacion=sections.explicacion,
            recomendacion=sections.recomendacion,
            fuentes=_sources(prepared.passages),
            retrieved_chunks=len(prepared.passages),
            llm_model=model,
            model_used=model,
            processing_time_ms=0,
            estadio=prepared.stage,
            pasajes=[p.id for p in prepared.passages],
            origen=origin,
        )


SECTIONS = ("explicacion", "recomendacion")


def _origin(from_sources: tuple[str, ...] | list[str]) -> SectionOrigin:
    """`origen` for an answer whose sections named in `from_sources` are the summary's."""
    return SectionOrigin(**{name: "fuentes" if name in from_sources else "modelo" for name in SECTIONS})


FROM_SOURCES = _origin(SECTIONS)


def _completed(written: Sections, summary: Sections) -> tuple[Sections, SectionOrigin]:
    """The model's sections where it has some text left (what the students were shown, or an
    answer not checked), the summary's where it has none; and which is which."""
    texts = {name: getattr(written, name).strip() for name in SECTIONS}
    empty = [name for name in SECTIONS if not texts[name]]
    for name in empty:
        texts[name] = getattr(summary, name)
    return Sections(**texts), _origin(empty)


def _support(canon: CanonicalState, case: LibraryCase | None, passages: list[PassageLike]) -> frozenset[str]:
    """The terms a prompt with these passages shows the model: what its sentences may claim."""
    # whole passages: a citation points to the source, not to the tightened excerpt
    numbered = [PromptPassage(n, p.texto) for n, p in with_citation_numbers(passages)]
    return support_of([SYSTEM_PROMPT, user_message(numbered, canon, case)])


def _fits(passage: PassageLike, case: LibraryCase | None) -> bool:
    """A library case's own passages only serve that case, never another student's state."""
    if "caso clinico" not in passage.temas:
        return True
    return case is not None and case.caso_id in passage.texto


def _draw(sampling: SamplingParams, attempt: int) -> SamplingParams:
    """The sampling of the n-th draw of a state (Flight.attempt): another seed each, so a state
    whose answer was withheld whole (the same prompt and seed would most likely write it again)
    gets another draw; a student's first request (attempt 0) samples as configured."""
    return dataclasses.replace(sampling, seed=sampling.seed + attempt) if attempt else sampling


def cacheable(llm_model: str) -> bool:
    """Whether an answer of this kind goes into the response cache: the model's, and one whose
    every sentence its sources did not support (the same prompt and seed would most likely be
    withheld again: it stands in while the backfill tries another draw); never a fallback for a
    busy, failed or missing model, which a later try may beat."""
    return not llm_model.startswith("fallback-") or llm_model == UNSUPPORTED


def _keeps_in_cache(llm_model: str, flight: Flight) -> bool:
    """Whether a flight's answer goes into the cache: a cacheable kind, except an answer whose
    every sentence was withheld when admission had shortened it. In class runs a busy engine's
    short answer for SEER_006 was one withheld sentence, and the cache then served the summary to
    every student who asked it (7-12 % of a class's answers); written in full, the same prompt
    gave a sentence to keep. Either way the backfill tries the state again (_draw)."""
    return cacheable(llm_model) and not (llm_model == UNSUPPORTED and flight.shortened)


def answer_budget(
    max_new_tokens: int,
    *,
    explanation_only: bool = False,
    keeps: Callable[[str], bool] | None = None,
    retries: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Token budgets for the two sections that never add up to more than max_new_tokens.

    A section ends at the first sentence end past its soft budget (35 % and 15 % of the total:
    two or three sentences, then one or two, as the system prompt asks); the hard caps (60 % and
    40 %) leave room to finish the sentence the model is writing, or, in the explanation, to
    write another when `keeps` (the grounding check) says none so far would be kept (an answer
    with no kept sentence at all is the summary's, `fallback-unsupported`; one kept sentence of
    the explanation is enough to avoid that, so the recommendation is not held: holding both
    made a 16-slot burst's slowest answer 4-9 s later). `explanation_only`: the explanation's
    budget alone (the recommendation comes from the sources). `retries` goes with `keeps`
    (Phase.retries)."""
    expl_hard = max_new_tokens * 3 // 5
    if explanation_only:
        return {
            "max_new_tokens": expl_hard,
            "phases": (Phase(max_new_tokens * 7 // 20, expl_hard, keeps=keeps, retries=retries),),
        }
    rec_hard = max_new_tokens - expl_hard
    return {
        "max_new_tokens": max_new_tokens,
        "phases": (
            Phase(
                max_new_tokens * 7 // 20,
                expl_hard,
                marker=SECTION_MARKER,
                transition=SECTION_MARKER,
                keeps=keeps,
                retries=retries,
            ),
            Phase(max_new_tokens * 3 // 20, rec_hard),
        ),
    }


def _sources(passages: list[PassageLike]) -> list[str]:
    """The passages' sources, in citation order, each once (citation_numbers: "[n]" is the n-th)."""
    seen: dict[str, None] = {}
    for p in passages:
        seen.setdefault(p.fuente, None)
    return list(seen)


def _timed(response: TeacherResponse, started: float, cache: str) -> TeacherResponse:
    elapsed = int((time.perf_counter() - started) * 1000)
    return response.model_copy(update={"processing_time_ms": elapsed, "cache": cache})


def system_prefix(template: ChatTemplate, tokenize: Callable[[str], list[int]]) -> list[int]:
    """The tokens every rendered prompt starts with: the chat template's system part."""
    a = tokenize(template.render(SYSTEM_PROMPT, "Fuentes: A"))
    return a[: common_prefix(a, tokenize(template.render(SYSTEM_PROMPT, "Paciente: B")))]
