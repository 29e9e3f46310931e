"""The llama.cpp model and context through llama-cpp-python's low-level API.

`LlamaRuntime` owns one model and one context whose KV cache holds several sequences: one cache
they all share (`unified`, the default), or one stream per sequence.

- Unified: a prompt prefix is shared between sequences without a copy. Attention sums a
  sequence's cells in cache order, and llama.cpp may put a new cell before a sequence's older ones
  (it searches from cell 0 again when enough cells before its head are free), so where earlier
  traffic left holes can change a greedy answer's rounding (BENCHMARKS.md, twelfth round).
- One stream per sequence: a sequence's cells stay in position order, so an answer is the same
  alone or beside others; sharing a prefix copies the source's whole stream (llama.cpp copies
  whole streams only, at its next decode) and drops the tail. llama.cpp computes a call in one
  pass per run of consecutive sequence ids and never mixes a prompt chunk with decode rows, so a
  16-headset burst ran 3-7 % slower here, despite attention reading only a row's own cells.

It is not thread-safe: only the engine's worker thread calls into it after construction.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


@dataclass(frozen=True)
class RuntimeConfig:
    model_path: Path
    n_ctx: int
    n_seq: int
    n_threads: int
    n_batch: int = 512
    unified: bool = True  # one KV cache for all sequences, or a stream each (module docstring)
    # llama.cpp's repacked CPU weights round differently with batch shape, so a sequence's output
    # would depend on its neighbours; on this machine they were not faster either (BENCHMARKS.md)
    repack: bool = False


_backend_ready = False


def _quiet_llama_logs(llama_cpp: object) -> None:
    """Route llama.cpp's chatty C logs away unless PULMOMED_LLAMA_LOG is set."""
    if os.environ.get("PULMOMED_LLAMA_LOG"):
        return

    @llama_cpp.llama_log_callback  # type: ignore[attr-defined, misc]
    def _sink(level: int, text: bytes, user_data: object) -> None:
        if level in (3, 4):  # warnings and errors reach our log (ggml: 1 debug, 2 info, 5 cont.)
            log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _quiet_llama_logs.sink = _sink  # type: ignore[attr-defined]  # keep the callback alive
    llama_cpp.llama_log_set(_sink, None)  # type: ignore[attr-defined]


class ModelLoadFailed(RuntimeError):
    """llama.cpp refused the model file (truncated, not a model it supports)."""


class ContextFailed(RuntimeError):
    """llama.cpp loaded the model but could not allocate the context (memory)."""


class LlamaRuntime:
    """One GGUF model, its vocabulary and a multi-sequence context."""

    def __init__(self, config: RuntimeConfig) -> None:
        import llama_cpp

        global _backend_ready
        self.lib = llama_cpp
        if not _backend_ready:
            _quiet_llama_logs(llama_cpp)
            llama_cpp.llama_backend_init()
            _backend_ready = True
        self.config = config
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = config.repack
        self.model = llama_cpp.llama_model_load_from_file(str(config.model_path).encode(), mparams)
        if not self.model:
            raise ModelLoadFailed(f"llama.cpp could not load {config.model_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_batch
        cparams.n_seq_max = config.n_seq
        cparams.n_threads = config.n_threads
        cparams.n_threads_batch = config.n_threads
        cparams.kv_unified = config.unified
        cparams.no_perf = True
        # flash attention skips other sequences' (masked) cells, so a sequence's arithmetic depends
        # less on who shares the batch (engine/batching.py says how far that holds)
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ContextFailed(f"llama.cpp could not create a {config.n_ctx}-token context (out of memory?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        # the cells one sequence may use: its stream (llama.cpp rounds it up to 256), or them all
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._closed = False

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace")

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        arr = (ctypes.c_int32 * capacity)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), arr, capacity, False, special)
        if n < 0:
            arr = (ctypes.c_int32 * -n)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), arr, -n, False, special)
        return list(arr[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # --- KV memory ------------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """`dst` gets `src`'s cells of positions p0..p1-1; it must already hold 0..p0-1 the same
        as `src` (with one stream per sequence, llama.cpp copies src's whole stream, and the cells
        from p1 on are then dropped)."""
        if self.config.unified:
            self.lib.llama_memory_seq_cp(self.memory, src, dst, p0, p1)
            return
        self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.lib.llama_memory_seq_rm(self.memory, dst, p1, -1)

    def seq_positions(self, seq: int) -> tuple[int, int]:
        """The first and last position the cache holds for `seq`; (-1, -1) when it holds none."""
        return (
            int(self.lib.llama_memory_seq_pos_min(self.memory, seq)),
            int(self.lib.llama_memory_seq_pos_max(self.memory, seq)),
        )

    # --- decoding -------------------------------------------------------------------------
    def decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """Decode (token, pos, seq, wants_logits) entries in one llama_decode; returns its code."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(entries)
        return int(self.lib.llama_decode(self.ctx, b))

    def logits(self, batch_index: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class Utf8Stream:
    """Turns token bytes into text without splitting a multi-byte character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
