"""What the teacher needs of a generation backend: the seam for a scale-out mode.

`GenerationEngine` (scheduler.py: llama.cpp in this process, one worker thread) is the backend
today. A mode that drives an existing inference server on a bigger machine would be a second one:
it takes the same `GenerationTask` (the prompt's tokens, the grammar, the sections' budgets, the
deadline, the cancel event), reports through the task's sink the same `TextEvent`, `DoneEvent`
and `ErrorEvent`, and answers admission's questions (`estimate`, `crowds`) from what it measures
of that server. teacher.py is written against this protocol only; the composition root (app.py)
picks the backend, and health adds the in-process engine's own figures (batch plan, step costs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .scheduler import GenerationTask


@runtime_checkable
class GenerationBackend(Protocol):
    failure: str | None  # why the backend stopped for good (None while it works)

    @property
    def running(self) -> bool:
        """submit() takes tasks."""

    @property
    def idle(self) -> bool:
        """No student's task is waiting or being written (background work may be)."""

    def submit(self, task: GenerationTask) -> None:
        """Queue a task (any thread); raises EngineBusy when full, EngineStopped when stopped."""

    def stalled_s(self) -> float:
        """How long the backend has made no progress, once that counts as stuck; else 0.0."""

    def stats(self) -> dict[str, int]:
        """Counts for health and the logs (queued, active, generations…)."""

    def new_prompt_tokens(self, prompt: list[int]) -> int:
        """About how many of this prompt's tokens it would evaluate if it started now."""

    def estimate(self, new_tokens: int) -> tuple[float, float]:
        """(seconds to a new task's first token, seconds per token after it)."""

    def crowds(self, new_tokens: int, grace_s: float = 0.0) -> bool:
        """Whether a new task now would push an answer already running past its deadline."""
