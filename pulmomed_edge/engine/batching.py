"""How many rows one llama_decode call holds.

llama.cpp's CPU backend computes each row of a call on its own but picks kernels by the call's
row count, and different kernels round differently, so a student's greedy answer can depend on
who else is in the batch. Measured here (llama-cpp-python 0.3.36, AVX2, 2 threads), a row's
logits changed bit-wise:
- at 64 rows per call, with both models tried (Qwen2.5-0.5B Q4_K_M, SmolLM2-135M Q4_1);
- at 8 rows, with Qwen, for contexts of 150-250 tokens;
- between 1 row and 2+ rows, with Qwen, once the cache window reaches 512 cells (a lone row's
  attention is split across threads, and then also depends on the cache's size).
Whether a switch shows in the output depends on the values (activations are rounded to 8 bits
before each product, which usually absorbs the difference). The engine avoids the switches that
cost nothing to avoid: no call straddles 64 rows, and prompt chunks keep at least 8 rows. The
others it does not: decoding a lone student in a padded two-row call doubled its decode time and,
on real prompts, did not make more answers identical (BENCHMARKS.md), so greedy output alone and
in a batch is usually identical, not always.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

MIN_PROMPT_ROWS = 8  # prompt chunks stay above the 8-row switch
KERNEL_SWITCH = 64  # no call straddles this one


@dataclass(frozen=True)
class BatchPlan:
    chunk: int  # the usual prompt chunk
    prefill_min: int
    prefill_max: int
    decode_rows: int = KERNEL_SWITCH - 1  # the most rows of a decode-only call

    @classmethod
    def for_chunk(cls, chunk: int) -> BatchPlan:
        """Chunks of chunk/2 .. 1.5 chunk rows, moved to one side of the 64-row switch."""
        low = max(1, chunk // 2)
        if low < KERNEL_SWITCH <= chunk:
            low = KERNEL_SWITCH
        high = max(chunk + low - 1, 2 * low - 1)  # prompt_rows needs high >= 2 * low - 1
        if low < KERNEL_SWITCH <= high:
            high = KERNEL_SWITCH - 1
        if low < MIN_PROMPT_ROWS or high < 2 * low - 1 or chunk > high:
            raise ValueError(f"no class of row counts fits prompt chunks of {chunk} rows")
        return cls(chunk, low, high)

    def chunk_beside(self, decode_rows: int) -> int:
        """The usual chunk of a call that carries `decode_rows`: it also takes the rows the call
        has left under the 64-row switch (a call paid for anyway reads more prompt: e2e p99 of a
        16-slot burst -7 %, BENCHMARKS.md), never past prefill_max."""
        return max(self.chunk, min(self.prefill_max, KERNEL_SWITCH - 1 - decode_rows))

    def prompt_rows(self, pending: int, decode_rows: int | None = None) -> int:
        """Rows of the next prompt chunk when `pending` prompt tokens are left, beside
        `decode_rows` (None: the plain chunk): every chunk, the last one included, stays within
        prefill_min..prefill_max (pending >= prefill_min is kept by the engine's reuse rule; a
        prompt shorter than that is evaluated whole)."""
        chunk = self.chunk if decode_rows is None else self.chunk_beside(decode_rows)
        if pending <= self.prefill_max:
            return pending
        if pending - chunk >= self.prefill_min:
            return chunk
        return pending - self.prefill_min

    def mixes(self, prompt_rows: int, decode_rows: int) -> bool:
        """Whether decode rows may share the prompt chunk's call (cheaper than two calls)."""
        return prompt_rows + decode_rows < KERNEL_SWITCH

    def as_dict(self) -> dict[str, object]:
        return {"prefill_rows": [self.prefill_min, self.prefill_max], "decode_rows": self.decode_rows}


# Until a row count has been seen, each extra decode row is taken to add this share of a lone
# row's step (Qwen2.5-0.5B, 2 cores: 1 row ~40 ms, 8 rows ~204 ms, 16 rows ~332 ms; the step from
# one row to two is the steepest, 76-106 ms).
ROW_COST_SHARE = 0.6


class StepCost:
    """Seconds of a decode-only call by its row count, learned from the engine's own calls.

    Admission asks what a step will cost once the students already admitted all decode together;
    a row count not seen yet is interpolated between the nearest seen ones, or extrapolated from
    the nearest with ROW_COST_SHARE of a lone row per extra row."""

    def __init__(self, lone_s: float = 0.05) -> None:
        self._default_lone = lone_s
        self._ema: dict[int, float] = {}
        self._lock = threading.Lock()

    def observe(self, rows: int, seconds: float) -> None:
        with self._lock:
            old = self._ema.get(rows)
            self._ema[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def predict(self, rows: int) -> float:
        rows = max(1, rows)
        with self._lock:
            ema = dict(self._ema)
        if rows in ema:
            return ema[rows]
        below = max((r for r in ema if r < rows), default=None)
        above = min((r for r in ema if r > rows), default=None)
        if below is not None and above is not None:
            share = (rows - below) / (above - below)
            return ema[below] + share * (ema[above] - ema[below])
        nearest = below if below is not None else above
        if nearest is None:
            return self._default_lone * (1 + ROW_COST_SHARE * (rows - 1))
        lone = ema[nearest] / (1 + ROW_COST_SHARE * (nearest - 1))
        return lone * (1 + ROW_COST_SHARE * (rows - 1))

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {str(rows): round(s, 4) for rows, s in sorted(self._ema.items())}
