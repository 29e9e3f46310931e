"""How many rows one llama_decode call may hold so that a row's arithmetic never depends on its
neighbours — the basis of "greedy output alone == in a batch".

llama.cpp's CPU kernels compute each row of a call independently, but pick a different kernel by
the call's row count, and different kernels round differently. Measured on this machine: with the
default Qwen2.5-0.5B Q4_K_M a row gives bit-identical logits in calls of 1–7 rows, again in calls
of 8–63 rows, and again from 64 rows on, but the three classes differ from each other; with
SmolLM2-135M Q4_1 the classes are 1–63 and 64+. Where the boundaries fall depends on the model's
tensor types and on how llama.cpp was built, so the engine probes them at start-up.

The rule the engine follows, given the probe:
- a prompt token is always evaluated in a call of `prefill_min`..`prefill_max` rows (one class);
- a generated or forced token is always evaluated in a call of at most `decode_rows` rows (the
  class of a single row: a lone student decodes one row per call);
- the two share a call only when one class covers them both (`mixed`).
Then every token is computed the same way whoever else is being served, and a cached prompt prefix
can be reused exactly (the chunk boundaries no longer matter, only the class).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .runtime import LlamaRuntime

log = logging.getLogger(__name__)

MAX_PROBE_ROWS = 63  # decode calls stay below 64 rows, where llama.cpp switched kernels on every model tried


@dataclass(frozen=True)
class BatchPlan:
    chunk: int  # the usual prompt chunk
    prefill_min: int
    prefill_max: int
    decode_rows: int
    mixed: bool  # decode rows may share a prompt chunk's call (at most prefill_max + decode_rows)
    verified: bool  # the probe confirmed each class; if not, invariance is not guaranteed

    def prompt_rows(self, pending: int) -> int:
        """Rows of the next prompt chunk when `pending` prompt tokens are left: every chunk,
        the last one included, stays within prefill_min..prefill_max (pending >= prefill_min
        is kept by the reuse rule; a prompt shorter than that is evaluated whole)."""
        if pending <= self.prefill_max:
            return pending
        if pending - self.chunk >= self.prefill_min:
            return self.chunk
        return pending - self.prefill_min

    def as_dict(self) -> dict[str, object]:
        return {
            "prefill_rows": [self.prefill_min, self.prefill_max],
            "decode_rows": self.decode_rows,
            "mixed": self.mixed,
            "verified": self.verified,
        }


def unprobed_plan(chunk: int, slots: int) -> BatchPlan:
    """The plan when nothing could be probed (no context to probe with): one class assumed."""
    low = max(1, chunk // 2)
    return BatchPlan(chunk, low, chunk + low - 1, max(1, slots), mixed=False, verified=False)


def probe_batch_plan(rt: LlamaRuntime, seq: int, tokens: list[int], chunk: int, slots: int) -> BatchPlan:
    """Find the row-count classes by decoding one probe row in calls of different sizes.

    The probe row is tokens[-1] after the context tokens[:-1] (evaluated once, in `seq`); filler
    rows follow it in the same sequence, so causality keeps them out of its attention and only
    the call's size can change its logits. Leaves `seq` empty. Assumes each class is a contiguous
    range of row counts (true of every model and build measured here)."""
    low = max(1, chunk // 2)
    high = chunk + low - 1
    if len(tokens) < 2:
        return unprobed_plan(chunk, slots)
    context, probe_token = tokens[:-1], tokens[-1]
    at = len(context)
    rt.seq_rm(seq, -1, -1)
    for start in range(0, at, chunk):
        part = context[start : start + chunk]
        if rt.decode([(t, start + i, seq, False) for i, t in enumerate(part)]) != 0:
            raise RuntimeError("llama_decode failed while probing batch sizes")
    seen: dict[int, np.ndarray] = {}

    def logits(rows: int) -> np.ndarray:
        if rows not in seen:
            rt.seq_rm(seq, at, -1)
            entries = [(probe_token, at, seq, True)]
            entries += [(context[i % at], at + i, seq, False) for i in range(1, rows)]
            if rt.decode(entries) != 0:
                raise RuntimeError("llama_decode failed while probing batch sizes")
            seen[rows] = rt.logits(0).copy()
        return seen[rows]

    def same(a: int, b: int) -> bool:
        return bool(np.array_equal(logits(a), logits(b)))

    try:
        # the largest decode call whose rows compute like a lone row
        top = min(MAX_PROBE_ROWS, max(slots + 8, 8))
        if same(1, top):
            decode_rows = top
        else:
            good, bad = 1, top
            while bad - good > 1:
                mid = (good + bad) // 2
                good, bad = (mid, bad) if same(1, mid) else (good, mid)
            decode_rows = good
        verified = same(low, high)
        mixed = (
            verified and high + decode_rows <= MAX_PROBE_ROWS and same(1, low) and same(1, high + decode_rows)
        )
    finally:
        rt.seq_rm(seq, -1, -1)
    plan = BatchPlan(chunk, low, high, decode_rows, mixed, verified)
    if not verified:
        log.warning(
            "prompt chunks of %d-%d rows do not compute alike with this model and build: "
            "greedy output may differ between a request alone and in a batch",
            low,
            high,
        )
    log.info("batch plan: %s", plan.as_dict())
    return plan
