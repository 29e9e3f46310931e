"""What the class got in the last minutes: the teacher's view of whether the laptop keeps up."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable

WINDOW_S = 600.0
MODEL = "modelo"  # written by the model (for this request, or a shared identical one)
CACHE = "cache"  # a cache hit
BUSY_KINDS = ("fallback-busy", "fallback-timeout")
# the model wrote an answer, but its sources supported none of its sentences: the student got the
# extractive summary instead
UNSUPPORTED = "fallback-unsupported"


def answer_kind(llm_model: str) -> str:
    """The kind of a delivered, non-cached answer: its fallback's name, or MODEL."""
    return llm_model if llm_model.startswith("fallback-") else MODEL


class RecentAnswers:
    """Answers delivered to students in a sliding window, by kind: MODEL, CACHE or the fallback."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def record(self, kind: str) -> None:
        with self._lock:
            self._events.append((self._clock(), kind))
            self._expire()

    def summary(self) -> dict[str, object]:
        with self._lock:
            self._expire()
            kinds = Counter(kind for _, kind in self._events)
        answers = sum(kinds.values())
        busy = sum(kinds[k] for k in BUSY_KINDS)
        return {
            "window_s": self.window_s,
            "answers": answers,
            "by_kind": dict(kinds),
            "busy_share": round(busy / answers, 3) if answers else 0.0,
        }

    def _expire(self) -> None:
        limit = self._clock() - self.window_s
        while self._events and self._events[0][0] < limit:
            self._events.popleft()
