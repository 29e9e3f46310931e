"""The knowledge index: passage embeddings searched through an hnswlib cosine graph, with a manifest.

An index directory holds three files written together: `index.bin` (the passage vectors, a NumPy
`.npy` array), `passages.jsonl` (the exact passages indexed, in label order, so lab documents travel
with it) and `manifest.json` (which encoder and encoder settings, which corpus, which lab folders,
which build parameters). Python opens every file: hnswlib's own save and load take a narrow C++
path, which a Windows user folder such as C:\\Users\\José breaks, and its save reports no failed
write; so the graph is rebuilt from the vectors at load, the same graph every time (one thread, a
fixed seed). A build holds a lock beside the index directory for its whole run (a second build of
the same index is refused at once), claims a sibling temporary directory before embedding (an
unwritable place fails at once), writes it and renames it into place, so a reader never sees half
an index. Loading checks every file against the manifest and the running encoder; anything off
raises `KnowledgeIndexError` whose fix is to rebuild (or, for a file it cannot read, to free it).
"""

from __future__ import annotations

import contextlib
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
from pulmomed_edge.files import LockHeld, remove_leftovers, take_lock

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from pulmomed_edge.embeddings import EmbeddingEncoder

INDEX_FILE = "index.bin"  # the passage vectors, a .npy array (the name predates format 2)
PASSAGES_FILE = "passages.jsonl"
MANIFEST_FILE = "manifest.json"
# 2: vectors stored with NumPy, the graph rebuilt at load; encoder settings in the manifest.
FORMAT_VERSION = 2
BUILD_FIX = "pulmomed-edge index build"
_EF_SEARCH = 64  # recall is exact at our size (a few hundred passages); cost stays sub-millisecond
_GRAPH_SEED = 100
_GRAPH_PARAMS = ("ef_construction", "M", "ef_search")
_REQUIRED = (
    "index_id", "encoder_sha256", "encoder_settings", "dim", "passage_count", "corpus_hash",
    "params", "files_sha256",
)  # fmt: skip


def _broken(mensaje_es: str, message_en: str) -> KnowledgeIndexError:
    return KnowledgeIndexError(mensaje_es, message_en, BUILD_FIX)


def _unreadable(path: Path, exc: OSError) -> KnowledgeIndexError:
    """A file of the index that exists but cannot be opened (permissions, a lock, a folder in its place)."""
    reason = exc.strerror or str(exc)
    return KnowledgeIndexError(
        f"No se puede leer {path} ({reason})",
        f"cannot read {path}: {reason}",
        f"check that {path} is a file this user may read; if another program has it open "
        "(an antivirus scan, a backup, an editor), close that program or wait, then try again",
    )


def make_index_id(
    corpus_sha: str, encoder_sha256: str, params: dict[str, Any], encoder_settings: Mapping[str, Any]
) -> str:
    """A short id naming this exact corpus, encoder (model and settings) and build parameters."""
    key = json.dumps([corpus_sha, encoder_sha256, params, dict(encoder_settings)], sort_keys=True)
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
        passages = list(passages)
        if not passages:
            raise _no_passages(corpus)
        _check_unique_ids(passages)
        out_dir = Path(out_dir)
        params = {"space": "cosine", "ef_construction": ef_construction, "M": M, "ef_search": _EF_SEARCH}
        with _build_lock(out_dir):
            # Claim the temp dir before embedding: an unwritable place fails at once, not after minutes.
            tmp = _make_build_dir(out_dir)
            try:
                vectors = _embed(passages, encoder, batch_size, progress)
                hnsw = _graph(vectors, params)
                corpus_sha = corpus_hash(passages)
                manifest = {
                    "format_version": FORMAT_VERSION,
                    "index_id": make_index_id(corpus_sha, encoder_sha256, params, encoder.settings),
                    "encoder_sha256": encoder_sha256,
                    "encoder_settings": encoder.settings,
                    "dim": encoder.dim,
                    "passage_count": len(passages),
                    "corpus_hash": corpus_sha,
                    "params": params,
                    "lab_documents": [str(folder) for folder in lab_documents],
                    "corpus": corpus,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                _write_index(tmp, vectors, passages, manifest, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return cls(hnsw, passages, manifest)

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        *,
        encoder_sha256: str,
        dim: int,
        encoder_settings: Mapping[str, Any] | None = None,
    ) -> KnowledgeIndex:
        """Open and validate an index built for this encoder; raise KnowledgeIndexError otherwise.

        `encoder_settings` is the running encoder's (`EmbeddingEncoder.settings`); without it, the
        index's token limit and pooling are checked against this version's."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        _check_encoder(manifest, encoder_sha256, dim, encoder_settings)
        _check_files(index_dir, manifest)
        passages = _read_passages(index_dir / PASSAGES_FILE)
        expected = manifest["passage_count"]
        if len(passages) != expected or corpus_hash(passages) != manifest["corpus_hash"]:
            raise _broken(
                "Los pasajes del índice no coinciden con su manifiesto",
                f"{PASSAGES_FILE} holds {len(passages)} passages (manifest: {expected}) or other content",
            )
        vectors = _read_vectors(index_dir / INDEX_FILE, len(passages), dim)
        return cls(_graph(vectors, manifest["params"]), passages, manifest)


def _graph(vectors: np.ndarray, params: Mapping[str, Any]) -> Any:
    """The hnswlib graph over `vectors`: the same vectors and params give the same graph."""
    import hnswlib

    hnsw = hnswlib.Index(space="cosine", dim=int(vectors.shape[1]))
    hnsw.init_index(
        max_elements=len(vectors),
        ef_construction=params["ef_construction"],
        M=params["M"],
        random_seed=_GRAPH_SEED,
    )
    hnsw.add_items(vectors, np.arange(len(vectors)), num_threads=1)  # one thread: a deterministic graph
    hnsw.set_ef(params["ef_search"])
    return hnsw


def _no_passages(corpus: str | None) -> KnowledgeIndexError:
    where = corpus or "pulmomed_edge/knowledge/corpus"
    return KnowledgeIndexError(
        f"No hay pasajes que indexar: el corpus ({where}) y las carpetas del laboratorio están vacíos",
        f"no passages to index: the corpus ({where}) and the lab folders hold none",
        f"add passages to the *.jsonl files in {where} (one JSON object per line), or build from "
        "another corpus folder: pulmomed-edge index build --corpus DIR (or --shipped-corpus)",
    )


def _check_encoder(
    manifest: dict[str, Any], encoder_sha256: str, dim: int, encoder_settings: Mapping[str, Any] | None
) -> None:
    if manifest["encoder_sha256"] != encoder_sha256:
        raise _broken(
            "El índice se construyó con otro modelo de embeddings",
            f"index was built with encoder sha256 {manifest['encoder_sha256']!r}, "
            f"but the loaded encoder is {encoder_sha256!r}",
        )
    if manifest["dim"] != dim:
        raise _broken(
            "La dimensión del índice no coincide con el modelo de embeddings",
            f"index dimension {manifest['dim']!r} does not match the encoder's {dim}",
        )
    mismatch = _encoder_settings_mismatch(manifest["encoder_settings"], encoder_settings)
    if mismatch is not None:
        raise _broken("El índice se construyó con otros ajustes del modelo de embeddings", mismatch)


def _encoder_settings_mismatch(recorded: Mapping[str, Any], current: Mapping[str, Any] | None) -> str | None:
    """Which encoder setting the index was built with differs from the running encoder's (without
    one: from this version's token limit and pooling), or None."""
    from pulmomed_edge.embeddings import MAX_TOKENS, POOLING

    expected = current if current is not None else {"max_tokens": MAX_TOKENS, "pooling": POOLING}
    for name, value in expected.items():
        if recorded.get(name) != value:
            return (
                f"index was built with encoder {name} {recorded.get(name)!r}, the encoder now uses {value!r}"
            )
    return None


def _check_files(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is there, readable, and matches its checksum."""
    for name, expected_sha in manifest["files_sha256"].items():
        path = index_dir / name
        try:
            actual_sha = _file_sha256(path)
        except FileNotFoundError as exc:
            raise _broken(
                f"Falta {name} en el índice {index_dir}", f"{name} is missing from the index at {index_dir}"
            ) from exc
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        if actual_sha != expected_sha:
            raise _broken(
                f"{name} está dañado o se modificó",
                f"{name} is damaged: it does not match its checksum in the manifest",
            )


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """Parse and check `manifest.json` of an index directory, or raise KnowledgeIndexError."""
    path = Path(index_dir) / MANIFEST_FILE
    manifest = _manifest_json(path)
    if manifest is None:
        raise _broken(f"No hay índice de conocimiento en {index_dir}", f"no knowledge index at {index_dir}")
    if not isinstance(manifest, dict):
        raise _broken("El manifiesto del índice está dañado", f"{path} is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _broken(
            "El índice se construyó con otra versión de PulmoMed Edge y hay que reconstruirlo",
            f"the index has format {manifest.get('format_version')!r}, this version reads format "
            f"{FORMAT_VERSION}: rebuild it",
        )
    if any(key not in manifest for key in _REQUIRED):
        raise _broken(
            "El manifiesto del índice está incompleto", f"{path} lacks one of {', '.join(_REQUIRED)}"
        )
    _check_manifest_fields(path, manifest)
    return manifest


def _check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The fields load() relies on have the right shape (a hand-edited manifest may not)."""
    checksums = manifest["files_sha256"]
    if not isinstance(checksums, dict) or set(checksums) != {INDEX_FILE, PASSAGES_FILE}:
        raise _broken(
            "El manifiesto del índice está incompleto",
            f"{path}: files_sha256 must name {INDEX_FILE}, {PASSAGES_FILE}",
        )
    params = manifest["params"]
    if (
        not isinstance(params, dict)
        or params.get("space") != "cosine"
        or not all(_is_positive_int(params.get(name)) for name in _GRAPH_PARAMS)
    ):
        raise _broken(
            "El manifiesto del índice está dañado",
            f"{path}: params must be space 'cosine' and positive integers {', '.join(_GRAPH_PARAMS)}",
        )
    if not isinstance(manifest["encoder_settings"], dict):
        raise _broken("El manifiesto del índice está dañado", f"{path}: encoder_settings is not an object")
    if not _is_positive_int(manifest["passage_count"]):
        raise _broken(
            "El manifiesto del índice está dañado", f"{path}: passage_count is not a positive integer"
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _manifest_json(path: Path) -> Any:
    """The parsed JSON of the manifest at `path`, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    except UnicodeDecodeError as exc:
        raise _broken("El manifiesto del índice está dañado", f"{path} is not UTF-8 text: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _broken("El manifiesto del índice está dañado", f"{path} is not valid JSON: {exc}") from exc


def _recorded(index_dir: str | Path) -> tuple[Path, dict]:
    """The manifest at `index_dir` as far as it parses ({} when there is no index), read alone so
    that a damaged index.bin or passages.jsonl, or an older format, still tells which sources to
    rebuild it from; raises KnowledgeIndexError only when the manifest is unreadable."""
    path = Path(index_dir) / MANIFEST_FILE
    manifest = _manifest_json(path)
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
    encoder_settings: Mapping[str, Any] | None = None,
) -> str | None:
    """Why the index must be rebuilt for these passages (and lab folders), or None when it is current.

    `encoder_settings` is the running encoder's (`EmbeddingEncoder.settings`, which names its
    tokenizer file); without it, the index's token limit and pooling are checked against this version's."""
    index_dir = Path(index_dir)
    try:
        manifest = read_manifest(index_dir)
    except KnowledgeIndexError as exc:
        return exc.message
    if manifest["encoder_sha256"] != encoder_sha256:
        return "built with another embedding model"
    mismatch = _encoder_settings_mismatch(manifest["encoder_settings"], encoder_settings)
    if mismatch is not None:
        return mismatch
    if manifest["corpus_hash"] != corpus_hash(list(passages)):
        return "the corpus or the lab documents changed"
    if lab_documents is not None and manifest.get("lab_documents", []) != list(lab_documents):
        return "other lab folders"
    return damage(index_dir)


def damage(index_dir: str | Path) -> str | None:
    """What is wrong with the index files themselves (a manifest unreadable or of an older format,
    a file missing, unreadable or not matching its checksum), or None when they are whole."""
    index_dir = Path(index_dir)
    try:
        _check_files(index_dir, read_manifest(index_dir))
    except KnowledgeIndexError as exc:
        return exc.message
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


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Hold the build lock of the index at `out_dir` for the block (a file beside it, as the build
    replaces the folder); when another build holds it, fail at once instead of waiting.

    Two builds swapping their temp dirs into `out_dir` at once failed midway with an "unwritable"
    error. The OS releases the lock when its process dies, so a killed build keeps no one out."""
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    try:
        held = take_lock(lock_path)
    except LockHeld:
        raise _build_in_progress(out_dir, lock_path) from None
    except OSError as exc:
        if os.path.lexists(lock_path):  # left by another user account's build, or a folder
            raise _unusable_lock(lock_path, exc) from exc
        raise _unwritable(out_dir, exc) from exc
    with held:
        yield


def _build_in_progress(out_dir: Path, lock_path: Path) -> KnowledgeIndexError:
    return KnowledgeIndexError(
        f"Ya hay otra reconstrucción del índice de conocimiento en curso ({out_dir})",
        f"another rebuild of the knowledge index at {out_dir} is in progress",
        f"wait for it to finish, then run this command again if still needed; if no other build "
        f"is running, delete {lock_path} and try again",
    )


def _unusable_lock(lock_path: Path, exc: OSError) -> KnowledgeIndexError:
    reason = exc.strerror or str(exc)
    return KnowledgeIndexError(
        f"No se puede usar el bloqueo de la reconstrucción del índice, {lock_path} ({reason})",
        f"cannot open the index's build lock {lock_path}: {reason}",
        f"if no build of this index is running, delete {lock_path} (a build by another user "
        "account may have left it) and try again",
    )


def _make_build_dir(out_dir: Path) -> Path:
    """A temp dir beside `out_dir` (same filesystem, so the final rename is atomic)."""
    try:
        # a build killed half-way (the console closed) left these
        remove_leftovers(out_dir.parent, (f".{out_dir.name}.building-*", f".{out_dir.name}.old-*"))
        build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        # mkdtemp's 0700 would keep a server running as another account (the teacher's) out
        build.chmod(0o755)
        return build
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
    return np.concatenate(parts, axis=0).astype(np.float32, copy=False)  # what index.bin holds


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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    except UnicodeDecodeError as exc:
        raise _broken(f"{PASSAGES_FILE} está dañado", f"{path} is corrupt: {exc}") from exc
    passages = []
    try:
        # "\n" only: str.splitlines() would also split inside a passage at U+2028, U+2029 or U+0085
        for line in text.split("\n"):
            if line.strip():
                passages.append(Passage.from_dict(json.loads(line)))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _broken(f"{PASSAGES_FILE} está dañado", f"{path} is corrupt: {exc}") from exc
    return passages


def _read_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """The (count, dim) float32 vectors in `path`, or KnowledgeIndexError; never unpickles."""
    try:
        with open(path, "rb") as fh:
            vectors = np.load(fh, allow_pickle=False)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    except (ValueError, EOFError) as exc:  # not a .npy file, truncated, or holding Python objects
        raise _broken(f"{INDEX_FILE} está dañado", f"{INDEX_FILE} is corrupt: {exc}") from exc
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.shape != (count, dim):
        found = (
            f"{vectors.dtype} {vectors.shape}" if isinstance(vectors, np.ndarray) else type(vectors).__name__
        )
        raise _broken(
            f"{INDEX_FILE} no coincide con los pasajes",
            f"{INDEX_FILE} holds {found}, not float32 vectors for {count} passages of dimension {dim}",
        )
    if not np.isfinite(vectors).all():
        raise _broken(f"{INDEX_FILE} está dañado", f"{INDEX_FILE} holds values that are not numbers")
    return vectors


def _write_index(
    tmp: Path, vectors: np.ndarray, passages: list[Passage], manifest: dict[str, Any], out_dir: Path
) -> None:
    """Write the three files into `tmp`, then swap it into place as `out_dir`."""
    try:
        with open(tmp / INDEX_FILE, "wb") as fh:
            np.save(fh, vectors, allow_pickle=False)
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as fh:
            for passage in passages:
                fh.write(json.dumps(passage.to_dict(), ensure_ascii=False) + "\n")
        # Checksums let load() reject a damaged file before it is parsed.
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
