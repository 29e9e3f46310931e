"""The Spanish knowledge corpus: passages read from JSONL files and chunked from lab documents.

A passage is the unit the index embeds and the teacher cites. The curated corpus lives in
`knowledge/corpus/*.jsonl` (one JSON object per line); a lab may add its own `.md`/`.txt`
documents, which are split into overlapping chunks of about 150 words, each citing the source
named on the document's first line (`Fuente: …`). Lab documents may be UTF-8 or Windows-1252, and
their passage ids are unique across every folder added.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from pulmomed_edge.errors import CorpusError

CHUNK_WORDS = 150
OVERLAP_WORDS = 30
_FIELDS = ("id", "titulo", "fuente", "temas", "texto")
_SOURCE_LINE = re.compile(r"^\s*fuente\s*:\s*(.+?)\s*$", re.IGNORECASE)
_HEADING = re.compile(r"^\s*#{1,6}\s+(.+?)\s*#*\s*$")
DOCUMENT_SUFFIXES = (".md", ".txt")


@dataclass(frozen=True)
class Passage:
    """One citable piece of knowledge."""

    id: str
    titulo: str
    fuente: str
    temas: tuple[str, ...]
    texto: str

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["temas"] = list(self.temas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Passage:
        return cls(
            id=str(data["id"]),
            titulo=str(data["titulo"]),
            fuente=str(data["fuente"]),
            temas=tuple(str(t) for t in data["temas"]),  # type: ignore[union-attr]
            texto=str(data["texto"]),
        )


def _bad_record(where: str, problem_es: str, problem_en: str) -> CorpusError:
    return CorpusError(
        f"{where}: {problem_es}",
        f"{where}: {problem_en}",
        "fix that line of the corpus file (keys: id, titulo, fuente, temas, texto)",
    )


def _parse_record(line: str, where: str) -> Passage:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _bad_record(where, f"JSON no válido ({exc.msg})", f"invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise _bad_record(where, "se esperaba un objeto JSON", "expected a JSON object")
    missing = [key for key in _FIELDS if key not in data]
    if missing:
        names = ", ".join(missing)
        raise _bad_record(where, f"faltan campos: {names}", f"missing keys: {names}")
    for key in ("id", "titulo", "fuente", "texto"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _bad_record(
                where, f"'{key}' debe ser texto no vacío", f"'{key}' must be a non-empty string"
            )
    temas = data["temas"]
    if not isinstance(temas, list) or not all(isinstance(t, str) for t in temas):
        raise _bad_record(where, "'temas' debe ser una lista de textos", "'temas' must be a list of strings")
    return Passage.from_dict(data)


def _check_unique(passages: list[Passage], where: dict[str, str], passage: Passage, here: str) -> None:
    if passage.id in where:
        raise _bad_record(
            here,
            f"id duplicado '{passage.id}' (ya en {where[passage.id]})",
            f"duplicate id '{passage.id}' (first seen at {where[passage.id]})",
        )
    where[passage.id] = here
    passages.append(passage)


def load_corpus(corpus_dir: str | Path) -> list[Passage]:
    """Read every *.jsonl file in `corpus_dir` (sorted by name) into passages."""
    corpus_dir = Path(corpus_dir)
    files = sorted(corpus_dir.glob("*.jsonl"))
    if not files:
        raise CorpusError(
            f"No hay ficheros .jsonl en {corpus_dir}",
            f"no *.jsonl files in {corpus_dir}",
            "give index build a folder of *.jsonl passage files (pulmomed-edge index build --corpus DIR), "
            "or build from the shipped corpus (--shipped-corpus)",
        )
    passages: list[Passage] = []
    seen: dict[str, str] = {}
    for path in files:
        # "\n" only: str.splitlines() would also split inside a text at U+2028, U+2029 or U+0085
        for lineno, line in enumerate(_corpus_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            here = f"{path.name}:{lineno}"
            _check_unique(passages, seen, _parse_record(line, here), here)
    return passages


def _unreadable(path: Path, exc: OSError) -> CorpusError:
    return CorpusError(
        f"{path}: no se puede leer ({exc.strerror})",
        f"{path}: cannot be read ({exc.strerror})",
        f"check the permissions of {path}",
    )


def _corpus_text(path: Path) -> str:
    """A corpus file's text: UTF-8, with or without the byte-order mark Notepad adds."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path.name}: no es texto UTF-8 (byte {exc.start})",
            f"{path.name}: is not UTF-8 text (byte {exc.start})",
            f"save {path} as UTF-8 (in Notepad: Save as… → Encoding: UTF-8)",
        ) from exc


def corpus_hash(passages: list[Passage]) -> str:
    """A stable sha256 over the passages' content, in order."""
    digest = hashlib.sha256()
    for passage in passages:
        # Canonical JSON per passage: key order and whitespace never change the hash.
        digest.update(json.dumps(passage.to_dict(), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def slugify(text: str) -> str:
    """ASCII, lowercase, dash-separated: 'Guía EGFR (2024)' → 'guia-egfr-2024'."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-") or "doc"


def _paragraph_words(body: str) -> list[list[str]]:
    paragraphs = re.split(r"\n\s*\n", body)
    return [p.split() for p in paragraphs if p.split()]


def _chunk_words(paragraphs: list[list[str]]) -> list[list[str]]:
    """Pack whole paragraphs into chunks of at most CHUNK_WORDS; each new chunk repeats up to
    OVERLAP_WORDS last words of the one before, fewer when the paragraph it opens with is long."""
    chunks: list[list[str]] = []
    current: list[str] = []
    fresh = 0  # words in `current` that are not overlap from the previous chunk
    for words in paragraphs:
        # A paragraph longer than a chunk is cut into slices; the carried overlap tops each one up.
        step = CHUNK_WORDS - OVERLAP_WORDS
        pieces = (
            [words[i : i + step] for i in range(0, len(words), step)] if len(words) > CHUNK_WORDS else [words]
        )
        for piece in pieces:  # each piece has at most CHUNK_WORDS words
            if fresh and len(current) + len(piece) > CHUNK_WORDS:
                chunks.append(current)
                overlap = min(OVERLAP_WORDS, CHUNK_WORDS - len(piece))
                current = current[-overlap:] if overlap else []
                fresh = 0
            current = current + piece
            fresh += len(piece)
    if fresh:
        chunks.append(current)
    return chunks


def _decode(path: Path) -> tuple[str, str]:
    """The document's text and the encoding it was read in ("utf-8", "utf-16" or "cp1252")."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    # Notepad's "Unicode" is UTF-16 with a BOM; Word and Notepad on a Spanish Windows save "ANSI",
    # Windows-1252 (Latin-1's letters and more), which a non-UTF-8 file is tried as, and said so.
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    for encoding in ("utf-16",) if utf16 else ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding), encoding.removesuffix("-sig")
        except UnicodeDecodeError:
            continue
    raise CorpusError(
        f"{path.name}: no es texto UTF-8, UTF-16 ni Windows-1252",
        f"{path.name}: is neither UTF-8, UTF-16 nor Windows-1252 text",
        f"save {path} as UTF-8 text",
    )


def _read_document(path: Path) -> tuple[str, str, str, str]:
    """Return (fuente, titulo, body, encoding) of one lab document."""
    text, encoding = _decode(path)
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    match = _SOURCE_LINE.match(lines[first]) if first is not None else None
    if match is None:
        raise CorpusError(
            f"{path.name}: la primera línea debe ser 'Fuente: …' con el origen del documento",
            f"{path.name}: the first line must be 'Fuente: …' naming the document's source",
            f"add a first line such as 'Fuente: Guía ESMO 2023' to {path}",
        )
    body_lines = lines[first + 1 :]  # type: ignore[operator]
    titulo = path.stem.replace("_", " ").replace("-", " ").strip()
    for index, line in enumerate(body_lines):
        heading = _HEADING.match(line)
        if heading:
            titulo = heading.group(1)
            del body_lines[index]
            break
        if line.strip():
            break  # the title heading, if any, must come before the text
    return match.group(1), titulo, "\n".join(body_lines), encoding


@dataclass(frozen=True)
class LabDocument:
    """One lab document as indexed: its passages' ids are `doc-<slug>-<n>`."""

    path: Path
    slug: str
    encoding: str  # "utf-8", "cp1252" or "utf-16"
    passages: tuple[Passage, ...]

    @property
    def renamed(self) -> bool:
        """True when its natural slug was taken by an earlier document (or a corpus id)."""
        return self.slug != slugify(self.path.stem)


@dataclass(frozen=True)
class LabFolder:
    """A folder of lab documents, as read: what was indexed and what was left out."""

    path: Path  # absolute
    documents: tuple[LabDocument, ...]
    skipped: tuple[str, ...]  # what was not read, e.g. ("2 .pdf", "1 subfolder")

    @property
    def passages(self) -> list[Passage]:
        return [p for doc in self.documents for p in doc.passages]


def _lab_folder_path(folder: str | Path) -> Path:
    path = Path(folder).expanduser().resolve()
    if not path.exists():
        raise CorpusError(
            f"La carpeta de documentos del laboratorio no existe: {path}",
            f"the lab documents folder does not exist: {path}",
            "check the folder given to --add",
        )
    if not path.is_dir():
        raise CorpusError(
            f"{path} es un archivo, no una carpeta",
            f"{path} is a file, not a folder",
            f"give --add the folder that holds the .md/.txt documents (e.g. --add {path.parent})",
        )
    return path


def _skipped_summary(paths: list[Path]) -> tuple[str, ...]:
    kinds: dict[str, int] = {}
    for path in paths:
        if path.name.startswith("."):
            kind = "hidden file"
        elif path.is_dir():
            kind = "subfolder"
        else:
            kind = path.suffix.lower() or "file without extension"
        kinds[kind] = kinds.get(kind, 0) + 1
    return tuple(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def _free_slug(path: Path, chunks: int, taken_ids: set[str]) -> str:
    """The first of slug(stem), slug(name), slug(folder-stem), slug(stem)-2, -3 … whose ids are all free."""
    stem = slugify(path.stem)
    candidates = [stem, slugify(path.name), slugify(f"{path.parent.name}-{path.stem}")]
    n = 2
    while True:
        for slug in candidates:
            if not any(f"doc-{slug}-{i}" in taken_ids for i in range(1, chunks + 1)):
                return slug
        candidates = [f"{stem}-{n}"]
        n += 1


def _read_lab_document(path: Path, taken_ids: set[str]) -> LabDocument:
    fuente, titulo, body, encoding = _read_document(path)
    body = re.sub(r"^\s*#{1,6}\s+", "", body, flags=re.MULTILINE)  # keep sub-heading words, drop marks
    chunks = _chunk_words(_paragraph_words(body))
    slug = _free_slug(path, len(chunks), taken_ids)
    passages = tuple(
        Passage(
            id=f"doc-{slug}-{n}", titulo=titulo, fuente=fuente, temas=("documento",), texto=" ".join(words)
        )
        for n, words in enumerate(chunks, start=1)
    )
    taken_ids.update(p.id for p in passages)
    return LabDocument(path, slug, encoding, passages)


def read_lab_folders(folders: list[str | Path], taken_ids: set[str] | None = None) -> list[LabFolder]:
    """Chunk the .md/.txt documents of each folder (in order, files sorted by name) into passages.

    Ids are unique across all folders and `taken_ids` (e.g. the corpus's): a document whose
    `doc-<slug>-<n>` ids are taken gets the slug of its full name ('guia.txt' → `guia-txt`), then
    of its folder and stem (`lab2-guia`), then `<slug>-2`, `-3` … The same folder given twice is
    read once.
    """
    taken = set(taken_ids or ())
    result: list[LabFolder] = []
    for folder in folders:
        path = _lab_folder_path(folder)
        if any(done.path == path for done in result):
            continue
        try:
            entries = sorted(path.iterdir())
        except OSError as exc:
            raise CorpusError(
                f"{path}: no se puede leer la carpeta ({exc.strerror})",
                f"{path}: cannot list the folder ({exc.strerror})",
                f"check the permissions of {path}",
            ) from exc
        # hidden files are skipped: macOS leaves '._guia.md' beside 'guia.md' on a USB stick
        readable = [
            p
            for p in entries
            if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES and not p.name.startswith(".")
        ]
        documents = tuple(_read_lab_document(doc, taken) for doc in readable)
        result.append(LabFolder(path, documents, _skipped_summary([p for p in entries if p not in readable])))
    return result


def chunk_documents(docs_dir: str | Path) -> list[Passage]:
    """Split every .md/.txt document in `docs_dir` into passages with ids `doc-<slug>-<n>`."""
    return read_lab_folders([docs_dir])[0].passages
