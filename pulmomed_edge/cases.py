"""The library of seven teaching cases (data in knowledge/cases.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import CASES_FILE
from .errors import CorpusError


@dataclass(frozen=True)
class LibraryCase:
    caso_id: str
    titulo: str
    estadio: str  # the case's own stage (TNM 8th ed.), whatever its tumour volumes would suggest
    descripcion: str
    edad: int
    es_fumador: bool
    pack_years: float
    dieta: str
    volumen_inicial_sensible: float
    volumen_inicial_resistente: float
    objetivos_aprendizaje: tuple[str, ...]
    fuente_estadistica: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["objetivos_aprendizaje"] = list(self.objetivos_aprendizaje)
        return data


class CaseLibrary:
    """Read-only lookup of the library cases, in file order."""

    def __init__(self, cases: list[LibraryCase]) -> None:
        self._cases = {c.caso_id: c for c in cases}

    @classmethod
    def load(cls, path: Path = CASES_FILE) -> CaseLibrary:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            cases = [
                LibraryCase(**{**item, "objetivos_aprendizaje": tuple(item["objetivos_aprendizaje"])})
                for item in raw
            ]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CorpusError(
                f"No se pudo leer la biblioteca de casos {path}: {exc}",
                f"Cannot read the case library {path}: {exc}",
                "reinstall PulmoMed Edge or restore pulmomed_edge/knowledge/cases.json",
            ) from exc
        return cls(cases)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._cases)

    def get(self, caso_id: str | None) -> LibraryCase | None:
        return self._cases.get(caso_id) if caso_id else None

    def all(self) -> list[LibraryCase]:
        return list(self._cases.values())
