"""Spanish prompts and the shape of the answer.

A prompt is ordered shared-first so the engine can reuse cached KV prefixes across students:
fixed system part → retrieved passages → library case → this student's bucketed state. The
answer has two labelled sections; a llama.cpp grammar guarantees both appear, each a run of
sentences with no line breaks, and the engine bounds each section's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .canonical import DIET_NAMES, LUNG_STATE_NAMES, CanonicalState, smoking_phrase, treatment_phrase
from .cases import LibraryCase

SYSTEM_PROMPT = (
    "Eres un profesor de oncología torácica que explica a estudiantes de medicina un caso simulado "
    "de cáncer de pulmón no microcítico (CPNM). Escribe en español claro, con frases completas. "
    "Usa solo los datos del paciente y los hechos de las fuentes numeradas, y cita la fuente así: [1]. "
    "No inventes cifras. Es una simulación educativa: di lo que considerarían las guías, sin dar "
    "órdenes clínicas. Tu respuesta tiene dos apartados: «Explicación:», dos o tres frases sobre qué "
    "le ocurre al tumor y por qué; y «Recomendación:», una o dos frases sobre lo que considerarían "
    "las guías para este paciente."
)

EXPLANATION_LABEL = "Explicación:"
RECOMMENDATION_LABEL = "Recomendación:"

# The answer: both labels, each followed by one line of text; the engine starts generation right
# after "Explicación:" (it is part of the prompt), so the grammar begins with the section text.
ANSWER_GRAMMAR = r"""
root ::= " " line "\n" "Recomendación:" " " line
line ::= first rest*
first ::= [A-ZÁÉÍÓÚÑ¿a-záéíóúñ0-9(\[]
rest ::= [^\n\r#*]
"""

PASSAGE_WORDS = 45


@dataclass(frozen=True)
class PromptPassage:
    number: int
    fuente: str
    texto: str


def tighten(text: str, max_words: int = PASSAGE_WORDS) -> str:
    """The passage's leading sentences up to about max_words, never cut inside a sentence."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    kept: list[str] = []
    count = 0
    for sentence in sentences:
        words = len(sentence.split())
        if kept and count + words > max_words:
            break
        kept.append(sentence)
        count += words
    return " ".join(kept)


def user_message(passages: list[PromptPassage], state: CanonicalState, case: LibraryCase | None) -> str:
    parts: list[str] = []
    if passages:
        parts.append("Fuentes:")
        parts.extend(f"[{p.number}] ({p.fuente}) {p.texto}" for p in passages)
    else:
        parts.append("Fuentes: ninguna relevante en la base de conocimiento.")
    if case is not None:
        parts.append("")
        parts.append(f"Caso de biblioteca: {case.titulo}. {case.descripcion}")
        parts.append("Objetivos de aprendizaje: " + "; ".join(case.objetivos_aprendizaje))
    parts.append("")
    parts.append("Paciente simulado:")
    parts.append(f"- Edad: {state.age_band} años")
    parts.append(f"- Tabaco: {smoking_phrase(state)}")
    parts.append(f"- Estadio aproximado por volumen tumoral: {state.stage}")
    parts.append(f"- Fracción de células resistentes: {state.resistant_band}")
    parts.append(f"- Tratamiento: {treatment_phrase(state)}")
    parts.append(f"- Dieta: {DIET_NAMES[state.diet]}")
    if state.lung_state:
        parts.append(f"- Estado pulmonar: {LUNG_STATE_NAMES[state.lung_state]}")
    parts.append("")
    parts.append("Escribe ahora la explicación y la recomendación para este paciente.")
    return "\n".join(parts)


@dataclass(frozen=True)
class Sections:
    explicacion: str
    recomendacion: str


def split_sections(generated: str) -> Sections | None:
    """The two sections of a generated answer (text after the 'Explicación:' prompt prefix)."""
    head, sep, tail = generated.partition(RECOMMENDATION_LABEL)
    if not sep:
        return None
    explicacion = complete_sentences(head.strip())
    recomendacion = complete_sentences(tail.strip())
    if not explicacion or not recomendacion:
        return None
    return Sections(explicacion, recomendacion)


def complete_sentences(text: str) -> str:
    """Drop a trailing unfinished sentence; a single unfinished one gets a closing period."""
    text = " ".join(text.split())
    if not text or text[-1] in ".!?":
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if cut > 0:
        return text[: cut + 1]
    return text.rstrip(",;:") + "."


SECTION_MARKER = "\n" + RECOMMENDATION_LABEL


class SectionTracker:
    """Splits streamed answer text into per-section deltas without leaking the section label."""

    def __init__(self) -> None:
        self.raw = ""
        self._sent = {"explicacion": 0, "recomendacion": 0}

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.raw += piece
        head, sep, tail = self.raw.partition(SECTION_MARKER)
        if not sep:
            head = head[: len(head) - _marker_overlap(head)]
        out: list[tuple[str, str]] = []
        for name, text in (("explicacion", head), ("recomendacion", tail if sep else "")):
            body = text.lstrip()
            new = body[self._sent[name] :]
            if new:
                self._sent[name] = len(body)
                out.append((name, new))
        return out


def _marker_overlap(text: str) -> int:
    """How many trailing characters of text could be the start of the section marker."""
    for n in range(min(len(SECTION_MARKER) - 1, len(text)), 0, -1):
        if SECTION_MARKER.startswith(text[-n:]):
            return n
    return 0
