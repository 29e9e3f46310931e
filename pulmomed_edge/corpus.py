"""The Spanish knowledge corpus: passages read from JSONL files and chunked from lab documents.

A passage is the unit the index embeds and the teacher cites. The curated corpus lives in
`knowledge/corpus/*.jsonl` (one JSON object per line); a lab may add its own `.md`/`.txt`
documents, which are split into overlapping chunks of about 150 words, each citing the source
named on the document's first line (`Fuente: …`).
"""

from __future__ import annotations

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
            "point the corpus directory at pulmomed_edge/knowledge/corpus",
        )
    passages: list[Passage] = []
    seen: dict[str, str] = {}
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            here = f"{path.name}:{lineno}"
            _check_unique(passages, seen, _parse_record(line, here), here)
    return passages


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
    """Pack whole paragraphs into ~CHUNK_WORDS chunks; each new chunk repeats the last words."""
    chunks: list[list[str]] = []
    current: list[str] = []
    fresh = 0  # words in `current` that are not overlap from the previous chunk
    for words in paragraphs:
        # A paragraph longer than a chunk is cut into slices; the carried overlap tops each one up.
        step = CHUNK_WORDS - OVERLAP_WORDS
        pieces = (
            [words[i : i + step] for i in range(0, len(words), step)] if len(words) > CHUNK_WORDS else [words]
        )
        for piece in pieces:
            if fresh and len(current) + len(piece) > CHUNK_WORDS:
                chunks.append(current)
                current = current[-OVERLAP_WORDS:]
                fresh = 0
            current = current + piece
            fresh += len(piece)
    if fresh:
        chunks.append(current)
    return chunks


def _read_document(path: Path) -> tuple[str, str, str]:
    """Return (fuente, titulo, body) of one lab document."""
    lines = path.read_text(encoding="utf-8").splitlines()
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
    return match.group(1), titulo, "\n".join(body_lines)


def chunk_documents(docs_dir: str | Path) -> list[Passage]:
    """Split every .md/.txt document in `docs_dir` into passages with ids `doc-<slug>-<n>`."""
    docs_dir = Path(docs_dir)
    paths = sorted(p for p in docs_dir.iterdir() if p.is_file() and p.suffix.lower() in {".md", ".txt"})
    passages: list[Passage] = []
    slugs: set[str] = set()
    for path in paths:
        fuente, titulo, body = _read_document(path)
        body = re.sub(r"^\s*#{1,6}\s+", "", body, flags=re.MULTILINE)  # keep sub-heading words, drop marks
        slug = slugify(path.stem)
        if slug in slugs:  # 'guia.md' and 'guia.txt' must not share ids
            slug = slugify(path.name)
        slugs.add(slug)
        for n, words in enumerate(_chunk_words(_paragraph_words(body)), start=1):
            passages.append(
                Passage(
                    id=f"doc-{slug}-{n}",
                    titulo=titulo,
                    fuente=fuente,
                    temas=("documento",),
                    texto=" ".join(words),
                )
            )
    return passages
