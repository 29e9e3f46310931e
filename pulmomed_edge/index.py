"""The knowledge index: an hnswlib cosine index of passage embeddings, with its manifest.

An index directory holds three files written together: `index.bin` (the hnswlib graph),
`passages.jsonl` (the exact passages indexed, in label order, so lab documents travel with it) and
`manifest.json` (which encoder, which corpus, which lab folders, which build parameters). A build
claims a sibling temporary directory before embedding (an unwritable place fails at once), writes
it and renames it into place, so a reader never sees half an index. Loading
checks every file against the manifest and the running encoder; anything off raises
`KnowledgeIndexError` whose fix is to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pulmomed_edge.corpus import Passage, corpus_hash
from pulmomed_edge.errors import KnowledgeIndexError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pulmomed_edge.embeddings import EmbeddingEncoder

INDEX_FILE = "index.bin"
PASSAGES_FILE = "passages.jsonl"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
BUILD_FIX = "pulmomed-edge index build"
_EF_SEARCH = 64  # recall is exact at our size (a few hundred passages); cost stays sub-millisecond


def _broken(mensaje_es: str, message_en: str) -> KnowledgeIndexError:
    return KnowledgeIndexError(mensaje_es, message_en, BUILD_FIX)


def make_index_id(corpus_sha: str, encoder_sha256: str, params: dict[str, Any]) -> str:
    """A short id naming this exact (corpus, encoder, parameters) triple."""
    key = json.dumps([corpus_sha, encoder_sha256, params], sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class KnowledgeIndex:
    """A loaded, validated index: search vectors, read passages and the manifest."""

    def __init__(self, hnsw: Any, passages: list[Passage], manifest: dict[str, Any]) -> None:
        self._hnsw = hnsw
        self.passages = passages
        self.manifest = manifest

    @property
    def index_id(self) -> str:
        return str(self.manifest["index_id"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Return up to k (passage_idx, cosine_similarity) pairs, most similar first."""
        if self._hnsw is None:
            raise _broken("El índice de conocimiento está cerrado", "the knowledge index is closed")
        k = min(k, len(self.passages))
        if k <= 0:
            return []
        labels, distances = self._hnsw.knn_query(np.asarray(vector, dtype=np.float32).reshape(1, -1), k=k)
        # hnswlib's cosine space returns 1 - cosine.
        return [(int(label), float(1.0 - dist)) for label, dist in zip(labels[0], distances[0], strict=True)]

    def similarities(self, vector: np.ndarray, ids: Sequence[int]) -> list[float]:
        """Cosine similarity between `vector` and the stored vectors of passages `ids`."""
        if not ids:
            return []
        stored = np.asarray(self._hnsw.get_items(list(ids)), dtype=np.float32)  # unit vectors in cosine space
        return [float(x) for x in stored @ np.asarray(vector, dtype=np.float32)]

    def close(self) -> None:
        self._hnsw = None

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        encoder: EmbeddingEncoder,
        out_dir: str | Path,
        *,
        encoder_sha256: str,
        progress: bool = True,
        ef_construction: int = 200,
        M: int = 16,  # hnswlib's own name for the graph degree
        batch_size: int = 32,
        lab_documents: Sequence[str] = (),
        corpus: str | None = None,
    ) -> KnowledgeIndex:
        """Embed `passages`, write a complete index into `out_dir` atomically, and return it loaded.

        `lab_documents` (absolute folder paths) and `corpus` (the corpus folder when it is not the
        shipped one) are recorded in the manifest, so a later build without `--add` or `--corpus`
        uses the same sources again.
        """
        import hnswlib

        passages = list(passages)
        if not passages:
            raise _broken("No hay pasajes que indexar", "no passages to index")
        _check_unique_ids(passages)
        out_dir = Path(out_dir)
        # Claim the temp dir before embedding: an unwritable place fails at once, not after minutes.
        tmp = _make_build_dir(out_dir)
        try:
            vectors = _embed(passages, encoder, batch_size, progress)
            hnsw = hnswlib.Index(space="cosine", dim=encoder.dim)
            hnsw.init_index(max_elements=len(passages), ef_construction=ef_construction, M=M, random_seed=100)
            # one thread: the same graph every build
            hnsw.add_items(vectors, np.arange(len(passages)), num_threads=1)
            hnsw.set_ef(_EF_SEARCH)

            params = {"space": "cosine", "ef_construction": ef_construction, "M": M, "ef_search": _EF_SEARCH}
            corpus_sha = corpus_hash(passages)
            manifest = {
                "format_version": FORMAT_VERSION,
                "index_id": make_index_id(corpus_sha, encoder_sha256, params),
                "encoder_sha256": encoder_sha256,
                "dim": encoder.dim,
                "passage_count": len(passages),
                "corpus_hash": corpus_sha,
                "params": params,
                "lab_documents": [str(folder) for folder in lab_documents],
                "corpus": corpus,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _write_index(tmp, hnsw, passages, manifest, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(hnsw, passages, manifest)

    @classmethod
    def load(cls, index_dir: str | Path, *, encoder_sha256: str, dim: int) -> KnowledgeIndex:
        """Open and validate an index built for this encoder; raise KnowledgeIndexError otherwise."""
        import hnswlib

        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        for name in (INDEX_FILE, PASSAGES_FILE):
            if not (index_dir / name).is_file():
                raise _broken(
                    f"Falta {name} en el índice {index_dir}", f"{name} missing from index {index_dir}"
                )
        if manifest.get("encoder_sha256") != encoder_sha256:
            raise _broken(
                "El índice se construyó con otro modelo de embeddings",
                f"index was built with encoder sha256 {manifest.get('encoder_sha256')!r}, "
                f"but the loaded encoder is {encoder_sha256!r}",
            )
        if manifest.get("dim") != dim:
            raise _broken(
                "La dimensión del índice no coincide con el modelo de embeddings",
                f"index dimension {manifest.get('dim')!r} does not match the encoder's {dim}",
            )
        for name, expected_sha in manifest["files_sha256"].items():
            if _file_sha256(index_dir / name) != expected_sha:
                raise _broken(
                    f"{name} está dañado o se modificó", f"{name} does not match its checksum in the manifest"
                )
        passages = _read_passages(index_dir / PASSAGES_FILE)
        expected = manifest.get("passage_count")
        if len(passages) != expected or corpus_hash(passages) != manifest.get("corpus_hash"):
            raise _broken(
                "Los pasajes del índice no coinciden con su manifiesto",
                f"{PASSAGES_FILE} holds {len(passages)} passages (manifest: {expected}) or other content",
            )
        hnsw = hnswlib.Index(space="cosine", dim=dim)
        try:
            hnsw.load_index(str(index_dir / INDEX_FILE), max_elements=len(passages))
        except Exception as exc:  # hnswlib raises RuntimeError, or worse, on a truncated file
            raise _broken(f"{INDEX_FILE} está dañado ({exc})", f"{INDEX_FILE} is corrupt: {exc}") from exc
        if hnsw.get_current_count() != len(passages):
            raise _broken(
                f"{INDEX_FILE} no coincide con los pasajes",
                f"{INDEX_FILE} holds {hnsw.get_current_count()} vectors for {len(passages)} passages",
            )
        hnsw.set_ef(int(manifest.get("params", {}).get("ef_search", _EF_SEARCH)))
        return cls(hnsw, passages, manifest)


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """Parse `manifest.json` of an index directory, or raise KnowledgeIndexError."""
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise _broken(f"No hay índice de conocimiento en {index_dir}", f"no knowledge index at {index_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _broken("El manifiesto del índice está dañado", f"{path} is not valid JSON: {exc}") from exc
    required = ("index_id", "encoder_sha256", "dim", "passage_count", "corpus_hash", "files_sha256")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        raise _broken(
            "El manifiesto del índice está incompleto", f"{path} lacks one of {', '.join(required)}"
        )
    checksums = manifest["files_sha256"]
    if not isinstance(checksums, dict) or set(checksums) != {INDEX_FILE, PASSAGES_FILE}:
        raise _broken(
            "El manifiesto del índice está incompleto",
            f"{path}: files_sha256 must name {INDEX_FILE}, {PASSAGES_FILE}",
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _broken(
            "El índice tiene un formato antiguo",
            f"index format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}",
        )
    return manifest


def _recorded(index_dir: str | Path) -> tuple[Path, dict]:
    """The manifest at `index_dir` as far as it parses ({} when there is no index), read alone so
    that a damaged index.bin or passages.jsonl still tells which sources to rebuild it from;
    raises KnowledgeIndexError only when the manifest is unreadable."""
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        return path, {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _broken("El manifiesto del índice está dañado", f"{path} is not valid JSON: {exc}") from exc
    return path, manifest if isinstance(manifest, dict) else {}


def recorded_lab_documents(index_dir: str | Path) -> list[str]:
    """The lab folders the index at `index_dir` was built with ([] when none or no index)."""
    path, manifest = _recorded(index_dir)
    folders = manifest.get("lab_documents", [])
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        raise _broken("El manifiesto del índice está dañado", f"{path}: lab_documents is not a list of paths")
    return folders


def recorded_corpus(index_dir: str | Path) -> str | None:
    """The corpus folder the index at `index_dir` was built from, when it was not the shipped one."""
    path, manifest = _recorded(index_dir)
    corpus = manifest.get("corpus")
    if corpus is not None and not isinstance(corpus, str):
        raise _broken("El manifiesto del índice está dañado", f"{path}: corpus is not a path")
    return corpus


def stale_reason(
    index_dir: str | Path,
    passages: Sequence[Passage],
    encoder_sha256: str,
    lab_documents: Sequence[str] | None = None,
) -> str | None:
    """Why the index must be rebuilt for these passages (and lab folders), or None when it is current."""
    index_dir = Path(index_dir)
    try:
        manifest = read_manifest(index_dir)
    except KnowledgeIndexError as exc:
        return exc.message
    if manifest["encoder_sha256"] != encoder_sha256:
        return "built with another embedding model"
    if manifest["corpus_hash"] != corpus_hash(list(passages)):
        return "the corpus or the lab documents changed"
    if lab_documents is not None and manifest.get("lab_documents", []) != list(lab_documents):
        return "other lab folders"
    return damage(index_dir)


def damage(index_dir: str | Path) -> str | None:
    """What is wrong with the index files themselves (unreadable manifest, a file missing or not
    matching its checksum), or None when they are whole."""
    index_dir = Path(index_dir)
    try:
        manifest = read_manifest(index_dir)
    except KnowledgeIndexError as exc:
        return exc.message
    for name, expected_sha in manifest["files_sha256"].items():
        path = index_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_sha256(path) != expected_sha:
            return f"{name} is damaged: it does not match its checksum"
    return None


def index_is_stale(index_dir: str | Path, passages: Sequence[Passage], encoder_sha256: str) -> bool:
    """True when the index is missing, damaged, or built from other passages or another encoder."""
    return stale_reason(index_dir, passages, encoder_sha256) is not None


def _check_unique_ids(passages: list[Passage]) -> None:
    """The teacher dedups and keys its cache by passage id: two passages must never share one."""
    seen: set[str] = set()
    for passage in passages:
        if passage.id in seen:
            raise KnowledgeIndexError(
                f"Id de pasaje duplicado: {passage.id}",
                f"duplicate passage id {passage.id!r}",
                "give every passage its own id (lab documents get unique ids from read_lab_folders)",
            )
        seen.add(passage.id)


def _unwritable(out_dir: Path, exc: OSError) -> KnowledgeIndexError:
    reason = exc.strerror or str(exc)
    return KnowledgeIndexError(
        f"No se puede escribir el índice en {out_dir} ({reason})",
        f"cannot write the index at {out_dir}: {reason}",
        f"make sure {out_dir.parent} is a folder you can write and the disk has free space, "
        "or set PULMOMED_INDEX_DIR to another folder",
    )


def _make_build_dir(out_dir: Path) -> Path:
    """A temp dir beside `out_dir` (same filesystem, so the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    except OSError as exc:
        raise _unwritable(out_dir, exc) from exc


def _embed(passages: list[Passage], encoder: EmbeddingEncoder, batch_size: int, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    texts = [passage_text(p) for p in passages]
    batches = range(0, len(texts), batch_size)
    bar = tqdm(
        total=len(texts), desc="Embedding passages", unit="passage", file=sys.stderr, disable=not progress
    )
    parts = []
    with bar:
        for start in batches:
            chunk = texts[start : start + batch_size]
            parts.append(encoder.encode(chunk, batch_size=batch_size))
            bar.update(len(chunk))
    return np.concatenate(parts, axis=0)


def passage_text(passage: Passage) -> str:
    """What the encoder sees for a passage: its title, then its text."""
    return f"{passage.titulo}. {passage.texto}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_passages(path: Path) -> list[Passage]:
    passages = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                passages.append(Passage.from_dict(json.loads(line)))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise _broken(f"{PASSAGES_FILE} está dañado", f"{path} is corrupt: {exc}") from exc
    return passages


def _write_index(
    tmp: Path, hnsw: Any, passages: list[Passage], manifest: dict[str, Any], out_dir: Path
) -> None:
    """Write the three files into `tmp`, then swap it into place as `out_dir`."""
    try:
        hnsw.save_index(str(tmp / INDEX_FILE))
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as fh:
            for passage in passages:
                fh.write(json.dumps(passage.to_dict(), ensure_ascii=False) + "\n")
        # Checksums let load() reject a damaged file before hnswlib's C++ reader sees it.
        manifest["files_sha256"] = {name: _file_sha256(tmp / name) for name in (INDEX_FILE, PASSAGES_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except OSError as exc:  # e.g. the disk filled up while writing
        raise _unwritable(out_dir, exc) from exc


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp`; a failure midway leaves the old index or the new one, never neither."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)  # two renames: POSIX cannot atomically swap non-empty directories
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
