"""The sentence encoder: an ONNX MiniLM run by onnxruntime, tokenised by `tokenizers`.

Texts become unit-length float32 vectors (mean-pooled over real tokens, then L2-normalised), so a
dot product between two vectors is their cosine similarity. One encoder is created at start-up,
shared, and closed at shutdown; onnxruntime sessions are safe to call from several threads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pulmomed_edge.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Sequence

MAX_TOKENS = 256
POOLING = "mean"  # over real (unpadded) tokens, then L2-normalised
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EmbeddingEncoder:
    """Encode Spanish (or any) text into normalised sentence vectors."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, threads: int = 1) -> None:
        # Imported here: onnxruntime and tokenizers take ~0.3 s to import.
        import onnxruntime as ort
        from tokenizers import Tokenizer

        onnx_path, tokenizer_path = Path(onnx_path), Path(tokenizer_path)
        for path in (onnx_path, tokenizer_path):
            if not path.is_file():
                raise ModelError(
                    f"Falta el fichero del modelo de embeddings: {path}",
                    f"embedding model file missing: {path}",
                    "pulmomed-edge models fetch",
                )
        try:
            tokenizer_json = tokenizer_path.read_bytes()  # read by Python: any user folder name works
            self._tokenizer_sha256 = hashlib.sha256(tokenizer_json).hexdigest()
            self._tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1  # one graph at a time; parallelism lives inside ops
            options.log_severity_level = 3  # keep onnxruntime's warnings out of the teacher's logs
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a corrupt file surfaces as several onnxruntime/tokenizers types
            raise ModelError(
                f"No se pudo cargar el modelo de embeddings ({exc})",
                f"could not load the embedding model: {exc}",
                "pulmomed-edge models verify",
            ) from exc
        self._tokenizer.enable_truncation(MAX_TOKENS)
        # The shipped tokenizer pads every text to 128; padding to the batch's longest is cheaper.
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._input_names = [i.name for i in self._session.get_inputs() if i.name in _INPUTS]
        width = self._session.get_outputs()[0].shape[-1]
        # An export with a symbolic hidden size names no number: ask the model once.
        self._dim = width if isinstance(width, int) else int(self._encode_batch(["dim"]).shape[1])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def settings(self) -> dict[str, Any]:
        """What, besides the ONNX model, shapes a vector: an index records it, and is rebuilt
        when it changes."""
        return {"max_tokens": MAX_TOKENS, "pooling": POOLING, "tokenizer_sha256": self._tokenizer_sha256}

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Return a float32 array of shape (len(texts), dim), each row of unit length."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        batches = [self._encode_batch(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(batches, axis=0)

    def encode_one(self, text: str) -> np.ndarray:
        """Return one unit vector of shape (dim,)."""
        return self.encode([text])[0]

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        hidden = self._session.run(None, {name: feeds[name] for name in self._input_names})[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)

    def close(self) -> None:
        """Release the onnxruntime session (idempotent)."""
        self._session = None  # type: ignore[assignment]
