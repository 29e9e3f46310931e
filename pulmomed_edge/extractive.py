"""Grounded answers without the LLM: built from the retrieved passages' own sentences.

Used when generation times out, fails, is busy or is not loaded, so a student always gets a
correct, sourced answer instead of an error or canned text.
"""

from __future__ import annotations

from .canonical import CanonicalState, smoking_phrase, treatment_phrase
from .prompts import SENTENCE_BREAK, Sections

_RECOMMENDATION_HINTS = (
    "recomienda",
    "estándar",
    "estandar",
    "guías",
    "guias",
    "indicad",
    "se considera",
    "consider",
    "tratamiento",
    "primera línea",
)

NO_COVERAGE = (
    "La base de conocimiento de PulmoMed no cubre esta situación concreta, así que no se citan fuentes."
)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_BREAK.split(text.strip()) if s.strip()]


def extractive_sections(
    state: CanonicalState, passages: list[tuple[int, str]], case_stage: str | None = None
) -> Sections:
    """passages: (number as cited in the answer, text), in retrieval order; case_stage: a library
    case's own stage (its volumes may suggest another)."""
    where = (
        f"Caso de biblioteca en estadio {case_stage}"
        if case_stage
        else f"El volumen tumoral total corresponde aproximadamente al estadio {state.stage}"
    )
    situation = f"{where}; paciente {smoking_phrase(state)}, {treatment_phrase(state)}."
    if not passages:
        return Sections(
            explicacion=f"{situation} {NO_COVERAGE}",
            recomendacion="Consulta las guías clínicas vigentes (por ejemplo, NCCN o ESMO) con tu "
            "docente para este escenario.",
        )
    first_number, first_text = passages[0]
    lead = sentences(first_text)[:2]
    explicacion = f"{situation} " + " ".join(lead) + f" [{first_number}]"
    recommendation = _recommendation_sentence(passages)
    return Sections(explicacion=explicacion.strip(), recomendacion=recommendation)


def _recommendation_sentence(passages: list[tuple[int, str]]) -> str:
    for number, text in passages:
        for sentence in sentences(text):
            lowered = sentence.lower()
            if any(hint in lowered for hint in _RECOMMENDATION_HINTS):
                return f"{sentence} [{number}]"
    number, text = passages[-1]
    return f"{sentences(text)[0]} [{number}]"
