"""The generation engine: the llama.cpp runtime, per-sequence sampling and the batching scheduler."""

from __future__ import annotations

from .backend import GenerationBackend
from .sampling import SamplingParams
from .scheduler import (
    DoneEvent,
    EngineBusy,
    EngineEvent,
    EngineStopped,
    ErrorEvent,
    GenerationEngine,
    GenerationTask,
    Phase,
    TextEvent,
)

__all__ = [
    "DoneEvent",
    "EngineBusy",
    "EngineEvent",
    "EngineStopped",
    "ErrorEvent",
    "GenerationBackend",
    "GenerationEngine",
    "GenerationTask",
    "Phase",
    "SamplingParams",
    "TextEvent",
]
