"""Retrieval: a student's question → the passages that ground the teacher's answer.

Two signals: the cosine of the English MiniLM encoder (through the hnswlib index) and BM25 over
folded Spanish tokens. On our evaluation files BM25 ranks far better than the encoder, and reciprocal
rank fusion of the two ranks worse than BM25 alone, so the default mode ("lexical") ranks by BM25 and
lets the cosine only break ties and fill in when too few passages share a word with the question;
"fused" (RRF) and "dense" stay selectable for comparison. Each hit says whether it is *grounded*:
its cosine or its share of the question's terms is high enough that the teacher may cite it.
Off-topic questions get no grounded hits, so the teacher falls back instead of inventing sources.
`evaluate` and `measure_speed` are the numbers behind these choices; `bench` reports them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pulmomed_edge.errors import CorpusError
from pulmomed_edge.lexical import fold

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pulmomed_edge.corpus import Passage
    from pulmomed_edge.embeddings import EmbeddingEncoder
    from pulmomed_edge.index import KnowledgeIndex
    from pulmomed_edge.lexical import LexicalIndex
    from pulmomed_edge.model_store import ModelStore

Mode = Literal["fused", "dense", "lexical"]
RRF_K = 60
CANDIDATES = 40  # per ranking; beyond this rank RRF adds < 1% to a score
TIE_BREAK = 0.1  # weight of the cosine next to BM25 scaled to 0..1 in "lexical" mode
# Grounding thresholds, set from the evaluation files and off-topic questions: off-topic hits reach
# cosine 0.53 and coverage 0.37 at most; on-topic top hits below 0.55 cosine cover ≥ 0.48.
MIN_COSINE = 0.55
MIN_COVERAGE = 0.45


@dataclass(frozen=True)
class Hit:
    """One retrieved passage and the evidence for it."""

    passage: Passage
    score: float  # the score that ranks hits (scaled BM25 + tie-break, or RRF)
    dense: float  # cosine similarity between question and passage
    lexical: float  # BM25 score (0 when no question word occurs in the passage)
    coverage: float  # IDF-weighted share of the question's terms found in the passage
    grounded: bool


class Retriever:
    """Search the knowledge index by meaning and by words, and judge each hit's grounding."""

    def __init__(
        self,
        index: KnowledgeIndex,
        encoder: EmbeddingEncoder,
        lexical: LexicalIndex | None,
        *,
        mode: Mode = "lexical",
        min_cosine: float = MIN_COSINE,
        min_coverage: float = MIN_COVERAGE,
    ) -> None:
        if mode not in ("fused", "dense", "lexical"):
            raise ValueError(f"unknown retrieval mode {mode!r}")
        if mode != "dense" and lexical is None:
            raise ValueError(f"mode {mode!r} needs a lexical index")
        self.index = index
        self.encoder = encoder
        self.lexical = lexical
        self.mode = mode
        self.min_cosine = min_cosine
        self.min_coverage = min_coverage

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k best passages for `query`, best first."""
        return self._search(query, self.encoder.encode_one(query), k)

    def _search(self, query: str, vector: np.ndarray, k: int) -> list[Hit]:
        bm25 = (
            self.lexical.scores(query) if self.lexical is not None else np.zeros(len(self.index), np.float32)
        )
        if self.mode == "lexical":
            scores = self._lexical_first(vector, bm25, k)
        else:
            scores = self._rank_fusion(vector, bm25, k)
        top = sorted(scores, key=lambda i: (-scores[i], i))[:k]
        hits = []
        for idx, cosine in zip(top, self.index.similarities(vector, top), strict=True):
            coverage = self.lexical.coverage(query, idx) if self.lexical is not None else 0.0
            grounded = cosine >= self.min_cosine or coverage >= self.min_coverage
            hits.append(
                Hit(self.index.passages[idx], scores[idx], cosine, float(bm25[idx]), coverage, grounded)
            )
        return hits

    def _lexical_first(self, vector: np.ndarray, bm25: np.ndarray, k: int) -> dict[int, float]:
        """BM25 scaled to 0..1 plus a small cosine term that breaks ties and fills in when few words match."""
        depth = min(len(self.index), max(CANDIDATES, k))
        ids = [int(i) for i in np.argsort(-bm25, kind="stable")[:depth] if bm25[i] > 0]
        ids += [i for i, _ in self.index.search(vector, k) if i not in ids]
        top_bm25 = float(bm25.max()) or 1.0
        return {
            i: float(bm25[i]) / top_bm25 + TIE_BREAK * c
            for i, c in zip(ids, self.index.similarities(vector, ids), strict=True)
        }

    def _rank_fusion(self, vector: np.ndarray, bm25: np.ndarray, k: int) -> dict[int, float]:
        """Reciprocal rank fusion of the dense ranking and (in "fused" mode) the BM25 ranking."""
        depth = min(len(self.index), max(CANDIDATES, k))
        rankings = [[i for i, _ in self.index.search(vector, depth)]]
        if self.mode == "fused":
            rankings.append([int(i) for i in np.argsort(-bm25, kind="stable")[:depth] if bm25[i] > 0])
        scores: dict[int, float] = {}
        for ranking in rankings:
            for rank, idx in enumerate(ranking, start=1):
                scores[idx] = scores.get(idx, 0.0) + 1.0 / (RRF_K + rank)
        return scores

    def close(self) -> None:
        """The retriever owns nothing: the index and encoder are closed by whoever opened them."""


_EVAL_FORMAT = 'one JSON object per line: {"query": "…", "any": ["stem", …]}'


def _bad_eval(where: str, problem_es: str, problem_en: str) -> CorpusError:
    return CorpusError(f"{where}: {problem_es}", f"{where}: {problem_en}", f"write {_EVAL_FORMAT}")


def _read_eval(path: str | Path) -> list[dict]:
    """The cases of an evaluation file, each checked; CorpusError names the file and line otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CorpusError(
            f"{path}: no se puede leer ({reason})",
            f"{path}: cannot be read ({reason})",
            f"check the path and permissions of {path}, a file of {_EVAL_FORMAT}",
        ) from exc
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: no es texto UTF-8", f"{path}: is not UTF-8 text", f"save {path} as UTF-8"
        ) from exc
    cases = [
        _eval_case(line, f"{path}:{lineno}")
        for lineno, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    if not cases:
        raise _bad_eval(str(path), "no contiene ninguna pregunta", "holds no queries")
    return cases


def _eval_case(line: str, where: str) -> dict:
    try:
        case = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _bad_eval(where, f"JSON no válido ({exc.msg})", f"invalid JSON ({exc.msg})") from exc
    if not isinstance(case, dict) or not isinstance(case.get("query"), str):
        raise _bad_eval(where, "falta 'query' (texto)", "'query' (a string) is missing")
    stems = case.get("any")
    if not isinstance(stems, list) or not stems or not all(isinstance(s, str) and s for s in stems):
        raise _bad_eval(
            where, "'any' debe ser una lista de textos no vacía", "'any' must be a non-empty list of strings"
        )
    return case


def evaluate(retriever: Retriever, jsonl_path: str | Path, *, depth: int = 10) -> dict:
    """hit@1/3/5 and MRR (over the top `depth`) of `retriever` on a file of {query, any: [stems]}."""
    cases = _read_eval(jsonl_path)
    found = {1: 0, 3: 0, 5: 0}
    reciprocal = 0.0
    grounded_top = 0
    misses = []
    for case in cases:
        hits = retriever.search(case["query"], k=depth)
        stems = [fold(s) for s in case["any"]]
        rank = next(
            (r for r, h in enumerate(hits, 1) if any(s in fold(h.passage.texto) for s in stems)), None
        )
        for k in found:
            found[k] += rank is not None and rank <= k
        reciprocal += 1.0 / rank if rank else 0.0
        grounded_top += bool(hits) and hits[0].grounded
        if rank is None or rank > 3:
            misses.append({"query": case["query"], "rank": rank, "top": [h.passage.id for h in hits[:3]]})
    n = len(cases)
    return {
        "hit@1": found[1] / n,
        "hit@3": found[3] / n,
        "hit@5": found[5] / n,
        "mrr": reciprocal / n,
        "n": n,
        "grounded_top": grounded_top / n,
        "misses": misses,
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(samples, 50)), "p95": float(np.percentile(samples, 95))}


def measure_speed(retriever: Retriever, queries: Sequence[str], *, rounds: int = 3, k: int = 5) -> dict:
    """Milliseconds to encode one query, and to search end to end (encode + dense + BM25 + fuse)."""
    retriever.search(queries[0], k=k)  # warm-up: first run allocates onnxruntime buffers
    encode_ms, search_ms = [], []
    for _ in range(rounds):
        for query in queries:
            start = time.perf_counter()
            retriever.encoder.encode_one(query)
            encode_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            retriever.search(query, k=k)
            search_ms.append((time.perf_counter() - start) * 1000)
    return {"encode_ms": _percentiles(encode_ms), "search_ms": _percentiles(search_ms), "n": len(search_ms)}


def open_encoder(store: ModelStore, *, test: bool = False, threads: int = 1) -> tuple[EmbeddingEncoder, str]:
    """The verified MiniLM encoder of a model set, and its sha256 (what an index is tied to)."""
    from pulmomed_edge.embeddings import EmbeddingEncoder

    name = store.default_name("embeddings", test=test)
    onnx = store.verify(name)
    tokenizer = store.verify(store.default_name("tokenizer", test=test))
    return EmbeddingEncoder(onnx, tokenizer, threads=threads), store.entry(name).sha256


def open_retriever(index_dir: str | Path, encoder: EmbeddingEncoder, encoder_sha256: str) -> Retriever:
    """A built index, checked against this encoder, with the lexical ranking beside it."""
    from pulmomed_edge.index import KnowledgeIndex
    from pulmomed_edge.lexical import LexicalIndex

    index = KnowledgeIndex.load(
        index_dir, encoder_sha256=encoder_sha256, dim=encoder.dim, encoder_settings=encoder.settings
    )
    return Retriever(index, encoder, LexicalIndex(index.passages))
