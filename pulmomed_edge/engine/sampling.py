"""Per-sequence token sampling with a llama.cpp grammar that costs almost nothing per token.

Masking the whole vocabulary with the grammar at every step made decoding ~2× slower, so we do
what llama.cpp's common sampler does: take the top-k candidates first, let the grammar judge only
those, and fall back to masking the full vocabulary only when none of them is allowed.
Repetition penalties apply to the k candidates, never to the full vocabulary.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .runtime import TOKEN_DATA, LlamaRuntime


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.3
    top_k: int = 40
    top_p: float = 0.9
    repeat_penalty: float = 1.15
    repeat_window: int = 64
    seed: int = 7


class GrammarRejected(RuntimeError):
    """No token the model could produce is allowed by the grammar."""


class SequenceSampler:
    """Samples the next token for one sequence; owns that sequence's grammar state."""

    def __init__(self, runtime: LlamaRuntime, grammar: str | None, params: SamplingParams) -> None:
        self.rt = runtime
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: list[int] = []
        self.grammar = None
        self._checkpoint = None  # a copy of the grammar's state (checkpoint / rewind)
        self._recent_at_checkpoint: list[int] = []
        self.last_p = 1.0  # the probability the last sample was chosen with
        if grammar:
            self.grammar = runtime.lib.llama_sampler_init_grammar(
                runtime.vocab, grammar.encode("utf-8"), b"root"
            )
            if not self.grammar:
                raise ValueError("llama.cpp rejected the answer grammar")

    def close(self) -> None:
        for sampler in (self.grammar, self._checkpoint):
            if sampler:
                self.rt.lib.llama_sampler_free(sampler)
        self.grammar = self._checkpoint = None

    def checkpoint(self) -> None:
        """Remember the state here (the grammar's, and the recent tokens the repetition penalty
        reads): rewind() returns to it when the engine takes a sentence back."""
        self._recent_at_checkpoint = list(self.recent)
        if self.grammar is None:
            return
        lib = self.rt.lib
        if self._checkpoint:
            lib.llama_sampler_free(self._checkpoint)
        self._checkpoint = lib.llama_sampler_clone(self.grammar)

    def rewind(self) -> None:
        """The state back to the last checkpoint."""
        self.recent = list(self._recent_at_checkpoint)
        if self.grammar is None or not self._checkpoint:
            return
        lib = self.rt.lib
        lib.llama_sampler_free(self.grammar)
        self.grammar = lib.llama_sampler_clone(self._checkpoint)

    # --- grammar --------------------------------------------------------------------------
    def _grammar_filter(self, ids: np.ndarray, logits: np.ndarray, grammar: object = None) -> np.ndarray:
        """Logits with the grammar (this sequence's, or `grammar`) applied: disallowed ones -inf."""
        grammar = grammar or self.grammar
        if grammar is None:
            return logits
        data = np.empty(len(ids), dtype=TOKEN_DATA)
        data["id"] = ids
        data["logit"] = logits
        data["p"] = 0.0
        arr = self.rt.lib.llama_token_data_array(
            data=data.ctypes.data_as(self.rt.lib.llama_token_data_p),
            size=len(ids),
            selected=-1,
            sorted=False,
        )
        self.rt.lib.llama_sampler_apply(grammar, ctypes.byref(arr))
        return data["logit"].copy()

    def allows_all(self, tokens: list[int]) -> bool:
        """Whether the grammar accepts these tokens in a row, leaving its state untouched."""
        if self.grammar is None:
            return True
        lib = self.rt.lib
        probe = lib.llama_sampler_clone(self.grammar)
        try:
            for token in tokens:
                allowed = self._grammar_filter(np.array([token], np.int32), np.zeros(1, np.float32), probe)
                if not np.isfinite(allowed[0]):
                    return False
                lib.llama_sampler_accept(probe, token)
            return True
        finally:
            lib.llama_sampler_free(probe)

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self.rt.lib.llama_sampler_accept(self.grammar, token)
        self.recent.append(token)
        if len(self.recent) > self.params.repeat_window:
            del self.recent[0]

    # --- sampling -------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, boost: dict[int, float] | None = None) -> int:
        """The next token; `boost` adds to chosen tokens' logits (boosted ones join the candidates)."""
        k = min(self.params.top_k, len(logits))
        ids = np.argpartition(logits, -k)[-k:].astype(np.int32)
        vals = logits[ids].astype(np.float32)
        if boost:
            present = set(ids.tolist())
            # a positive boost brings its token into the candidates; a negative one only demotes
            extra = np.array([t for t, b in boost.items() if b > 0 and t not in present], dtype=np.int32)
            ids = np.concatenate([ids, extra])
            vals = np.concatenate([vals, logits[extra].astype(np.float32)])
            vals = vals + np.array([boost.get(int(t), 0.0) for t in ids], dtype=np.float32)
        vals = self._grammar_filter(ids, vals)
        if not np.isfinite(vals).any():
            # rare: the grammar forbids every top candidate, so judge the whole vocabulary
            all_ids = np.arange(len(logits), dtype=np.int32)
            masked = self._grammar_filter(all_ids, logits.astype(np.float32))
            allowed = np.flatnonzero(np.isfinite(masked))
            if len(allowed) == 0:
                raise GrammarRejected("the grammar allows no token")
            top = allowed[np.argsort(-masked[allowed], kind="stable")[:k]]
            ids, vals = top.astype(np.int32), masked[top]
        order = np.lexsort((ids, -vals))  # by logit, ties by id: deterministic
        ids, vals = ids[order], vals[order]
        vals = self._penalize(ids, vals)
        finite = np.isfinite(vals)
        ids, vals = ids[finite], vals[finite]
        if self.params.temperature <= 0:
            best = int(np.argmax(vals))
            self.last_p = float(1.0 / np.exp(vals - vals[best]).sum())
            return int(ids[best])
        scaled = (vals - vals.max()) / self.params.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, self.params.top_p) + 1)]
        p = probs[keep] / probs[keep].sum()
        chosen = self.rng.choice(len(keep), p=p)
        self.last_p = float(probs[keep][chosen])
        return int(ids[keep][chosen])

    def _penalize(self, ids: np.ndarray, vals: np.ndarray) -> np.ndarray:
        if self.params.repeat_penalty == 1.0 or not self.recent:
            return vals
        seen = np.isin(ids, np.fromiter(set(self.recent), dtype=np.int32))
        penalty = self.params.repeat_penalty
        return np.where(seen, np.where(vals > 0, vals / penalty, vals * penalty), vals)
