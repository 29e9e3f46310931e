"""Spanish prompts and the shape of the answer.

A prompt is ordered shared-first so the engine can reuse cached KV prefixes across students:
fixed system part → retrieved passages → library case → this student's bucketed state. The
answer has two labelled sections; a llama.cpp grammar guarantees both appear, each a run of
sentences with no line breaks, and the engine bounds each section's length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .canonical import LUNG_STATE_NAMES, CanonicalState, smoking_phrase, treatment_phrase
from .cases import LibraryCase
from .engine.markers import marker_overlap

SYSTEM_PROMPT = (
    "Eres un profesor de oncología torácica. Explicas a estudiantes de medicina un caso simulado de "
    "cáncer de pulmón no microcítico, en español claro y con frases completas. Usa solo los datos "
    "del paciente y los hechos de las fuentes numeradas, y cita la fuente con su número entre "
    "corchetes. Es una simulación educativa: di lo que considerarían las guías. Responde en dos "
    "partes: primero, en dos o tres frases, qué le ocurre al tumor y por qué; después, en una o dos "
    "frases, qué tratamiento o medida considerarían las guías para este paciente."
)

EXPLANATION_LABEL = "Explicación:"
RECOMMENDATION_LABEL = "Recomendación:"

# The answer: both labels, each followed by one line of text; the engine starts generation right
# after "Explicación:" (it is part of the prompt), so the grammar begins with the section text.
_LINE_RULES = r"""
line ::= first rest*
first ::= [A-ZÁÉÍÓÚÑ¿a-záéíóúñ0-9(\[]
rest ::= [^\n\r#*«»"]
"""
ANSWER_GRAMMAR = 'root ::= " " line "\\n" "Recomendación:" " " line' + _LINE_RULES
# the explanation alone, when the recommendation is the sources' own (Settings.recommendation)
EXPLANATION_GRAMMAR = 'root ::= " " line' + _LINE_RULES

PASSAGE_WORDS = 32
# a library case's own passage: its opening sentence is only who the patient is, and the model
# made up the findings («nódulos en el otro pulmón» for a pleural effusion); its next sentences
# have them, and every student of that case shares them (one cached prefix per case)
CASE_PASSAGE_WORDS = 90
CASE_PASSAGE = "Caso de biblioteca "
# a sentence ends at a closing mark followed by a space ("8.ª", "0.5" go on): one rule for
# tightening passages, the extractive answer, and the grounding check (streamed and final)
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
CASE_GOALS = 1  # a library case's main teaching goal goes into the prompt


@dataclass(frozen=True)
class PromptPassage:
    number: int
    texto: str


def citation_numbers(sources: Iterable[str]) -> list[int]:
    """Each passage's citation number, given the passages' sources in prompt order: the place of
    its source among the distinct sources, so that "[n]" is always the answer's `fuentes[n-1]`
    (which lists each source once), also when two passages come from the same source."""
    places: dict[str, int] = {}
    return [places.setdefault(source, len(places) + 1) for source in sources]


def tighten(text: str, max_words: int = PASSAGE_WORDS) -> str:
    """The passage's leading sentences up to about max_words, never cut inside a sentence."""
    sentences = SENTENCE_BREAK.split(text.strip())
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
    """Shared-first: passages (ordered by aspect, so students in the same stage and treatment share
    the leading ones), then the case's teaching goals, then this student's state, most shared first.

    Every token after the first difference from a cached prompt is evaluated again for this
    student, so nothing constant goes last: the instruction lives in the system prompt."""
    parts: list[str] = []
    if passages:
        parts.append("Fuentes:")
        # sources are cited by number only: their names go to `fuentes`, not into the prompt
        parts.extend(f"[{p.number}] {p.texto}" for p in passages)
    else:
        parts.append("Fuentes: ninguna relevante en la base de conocimiento.")
    if case is not None:
        # the case's facts arrive as its retrieved passage; here only what to teach
        goals = "; ".join(case.objetivos_aprendizaje[:CASE_GOALS])
        parts.append(f"Objetivo del caso: {goals}.")
    parts.append(patient_line(state, case))
    return "\n".join(parts)


def patient_line(state: CanonicalState, case: LibraryCase | None) -> str:
    """The student's patient in plain Spanish, most shared first (stage, treatment, resistance,
    then age and smoking). Plain words, because the model copies what it reads: a list of labels
    came back as "la célula resistentes es 0 %". A library case's stage is its own (a metastatic
    case can have a small primary, which the volume bands would stage wrongly), and its passage,
    tightened to its first sentence, does not say it. Diet stays out: guidelines say nothing of
    it, and it only drew invented diet advice."""
    stage = f"estadio del caso: {case.estadio}" if case is not None else f"estadio aproximado {state.stage}"
    facts = [stage, treatment_phrase(state), _resistance(state.resistant_band)]
    facts += [f"edad {state.age_band} años", smoking_phrase(state)]
    if state.lung_state:
        facts.append(f"estado pulmonar {LUNG_STATE_NAMES[state.lung_state]}")
    return "Paciente: " + "; ".join(facts) + "."


def _resistance(band: str) -> str:
    """'sin células resistentes', or how large a share of the tumour they are."""
    return "sin células resistentes" if band == "0 %" else f"células resistentes: {band} del tumor"


class ChatRenderer(Protocol):
    def render(self, system: str, user: str, assistant_prefix: str = "") -> str: ...


class HasText(Protocol):
    texto: str
    fuente: str


Cited = TypeVar("Cited", bound=HasText)


def with_citation_numbers(passages: Sequence[Cited]) -> list[tuple[int, Cited]]:
    """Each passage with the number the answer cites it by (citation_numbers)."""
    return list(zip(citation_numbers(p.fuente for p in passages), passages, strict=True))


def render_prompt(
    template: ChatRenderer, state: CanonicalState, case: LibraryCase | None, passages: list[HasText]
) -> str:
    """The whole prompt text, ending where the model starts writing the explanation."""
    numbered = [PromptPassage(n, _tightened(p.texto)) for n, p in with_citation_numbers(passages)]
    return template.render(SYSTEM_PROMPT, user_message(numbered, state, case), EXPLANATION_LABEL)


def _tightened(text: str) -> str:
    if text.startswith(CASE_PASSAGE):  # the model copied the internal id into students' text
        return tighten(without_case_label(text), CASE_PASSAGE_WORDS)
    return tighten(text, PASSAGE_WORDS)


# A library case's passages open with its internal id and a short description (the patient line
# and the summary's lead-in say which case it is): «Caso de biblioteca SEER_001_estadio_IA (…): …»
_CASE_LABEL = re.compile(r"^Caso de biblioteca \S+ \(.*?\):\s+")


def without_case_label(text: str) -> str:
    """A passage's text without a library case's opening «Caso de biblioteca <id> (<description>): »
    (up to the first "): "), capitalised so that it still reads as a sentence; others unchanged."""
    rest, found = _CASE_LABEL.subn("", text.strip(), count=1)
    return rest[:1].upper() + rest[1:] if found else rest


@dataclass(frozen=True)
class Sections:
    explicacion: str
    recomendacion: str


def split_sections(generated: str) -> Sections | None:
    """The two sections of a generated answer (text after the 'Explicación:' prompt prefix)."""
    head, sep, tail = generated.partition("\n" + RECOMMENDATION_LABEL)
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
            head = head[: len(head) - marker_overlap(head, SECTION_MARKER)]
        out: list[tuple[str, str]] = []
        for name, text in (("explicacion", head), ("recomendacion", tail if sep else "")):
            body = text.lstrip()
            new = body[self._sent[name] :]
            if new:
                self._sent[name] = len(body)
                out.append((name, new))
        return out
