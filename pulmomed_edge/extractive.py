"""Grounded answers without the LLM: built from the retrieved passages' own sentences.

Used when generation times out, fails, is busy or is not loaded, so a student always gets a
correct, sourced answer instead of an error or canned text; and, section by section, where the
grounding check withheld every sentence the model wrote (the answer's `origen` says which).
"""

from __future__ import annotations

import re

from .canonical import (
    DYING,
    CanonicalState,
    next_step,
    progressing_on_treatment,
    smoking_phrase,
    stage_group,
    treatment_phrase,
)
from .prompts import SENTENCE_BREAK, Sections, without_case_label

# What makes a sentence the recommendation, strongest first: one that names the standard or
# recommended option beats one that cites a guideline, which beats one that only mentions a
# treatment ("curable con un tratamiento local"). "indicad" is not among the strongest: the case
# passages also use it for what was not indicated ("no fue un cribado indicado por esa guía").
_RECOMMENDATION_HINTS = (
    (
        "estándar",
        "estandar",
        "recomienda",
        "de elección",
        "de eleccion",
        "de referencia",
        "primera línea",
        "primera linea",
    ),
    ("indicad", "guía", "guia", "se considera", "consider"),
    ("tratamiento",),
)

# A hint said of what is not done ("La radiografía de tórax no se recomienda…", "No está indicado
# en…", "no fue un cribado indicado"): never the recommendation. ("no microcítico" is a name.)
_NEGATED_HINT = re.compile(
    r"\bno\b(?!\s+microc)[^,;.]{0,30}?(?:recomiend|indicad|est[aá]ndar|de elecci[oó]n)", re.IGNORECASE
)

# What a critical or terminal patient is not offered, and what they are: the stage's standard
# (surgery, chemoradiotherapy…) was served to a terminal patient on immunotherapy
_SURGERY = re.compile(
    r"\b(?:cirug[ií]a|operar|operables?|resecci[oó]n|lobectom[ií]a|quir[uú]rgic)", re.IGNORECASE
)
_PALLIATIVE = re.compile(r"\bpaliativ", re.IGNORECASE)
# What a patient whose tumour grows under treatment is told: to be re-evaluated for another
# treatment, and in advanced disease which second line (a patient progressing on chemotherapy was
# offered surgery, the stage's first treatment)
_REEVALUATION = re.compile(r"\breeval[uú]", re.IGNORECASE)
# the second line, by whether the tumour progresses on immunotherapy (then a platinum doublet, or
# docetaxel after chemotherapy with it) or on another treatment (then immunotherapy)
_SECOND_LINE = {
    True: re.compile(r"\bprogresa con inmunoterapia\b", re.IGNORECASE),
    False: re.compile(r"\bsegunda l[ií]nea est[aá]ndar es un inhibidor de PD-1", re.IGNORECASE),
}
# What a patient on treatment whose tumour does not grow is told, by stage (a stage II patient 100
# days into chemotherapy was offered surgery then adjuvant chemotherapy, the stage's first
# treatment): in stage I-II to complete the curative plan, or CT follow-up after radiotherapy; in
# stage IV to keep the treatment and assess the response (on radiotherapy, what radiotherapy is for
# there)
_NEXT_STEP = {
    # the stage I passage's standard: surgery, or SBRT when the patient is not operable
    "local": re.compile(r"\btratamiento est[aá]ndar en quien puede operarse\b", re.IGNORECASE),
    "curative": re.compile(r"\bse recomienda completar el plan previsto\b", re.IGNORECASE),
    "radiotherapy": re.compile(r"\bTC de t[oó]rax cada 3 a 6 meses\b", re.IGNORECASE),
    "advanced": re.compile(r"\bse recomienda mantenerlo y evaluar la respuesta\b", re.IGNORECASE),
    # radiotherapy in stage IV relieves symptoms while the systemic treatment controls the disease
    "advanced-radiotherapy": re.compile(r"\bse usan sobre todo para aliviar s[ií]ntomas\b", re.IGNORECASE),
}

# a sentence that tells a smoker to quit («Dejar de fumar después del diagnóstico… sigue siendo
# importante», «Dejar de fumar (cesación tabáquica) sigue siendo…»)
_QUITTING = re.compile(r"^Dejar de fumar\b")

# The sentence after a recommendation that limits it («Ese ensayo solo incluyó pacientes con ECOG
# 0–1, así que en ECOG 2 la decisión se individualiza»): the summary quoted pembrolizumab for an
# ECOG 2 patient without it
_CAVEAT = re.compile(
    r"^(?:Es[ea]s? (?:ensayo|esquema|estudio|opci[oó]n|tratamiento)|Aun as[ií]|Sin embargo)|individualiza"
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
    passages = [(number, without_case_label(text)) for number, text in passages]
    first_number, first_text = passages[0]
    lead = sentences(first_text)[:2]
    explicacion = f"{situation} " + " ".join(lead) + f" [{first_number}]"
    prefer, no_surgery = _focus(state, case_stage or state.stage)
    recommendation = _recommendation_sentence(passages, prefer=prefer, no_surgery=no_surgery)
    if state.smoking == "fumador" and (quitting := _quitting_sentence(passages, recommendation)):
        recommendation = f"{recommendation} {quitting}"
    return Sections(explicacion=explicacion.strip(), recomendacion=recommendation)


def _quitting_sentence(passages: list[tuple[int, str]], recommendation: str) -> str:
    """For a current smoker, the retrieved passages' first sentence on quitting, cited ("" when
    none, or when the recommendation already is it): read again after this round's fixes, no
    current smoker's answer mentioned quitting, though a case's goal is that it still matters."""
    for number, text in passages:
        for sentence in sentences(text):
            if _QUITTING.search(sentence) and sentence not in recommendation:
                return f"{sentence} [{number}]"
    return ""


def _focus(state: CanonicalState, stage: str) -> tuple[re.Pattern[str] | None, bool]:
    """What this patient's recommendation must be about, and whether surgery is out of it: a
    critical or terminal patient's is palliative care; one whose tumour grows under treatment is
    re-evaluated, and in stage III-IV given the second line for the treatment they progress on.
    One on treatment whose tumour does not grow completes the curative plan in stage I-II (CT
    follow-up after radiotherapy) and keeps the treatment, its response assessed, in stage IV; in
    stage III the stage's standard names what follows (consolidation after chemoradiotherapy)."""
    if state.lung_state in DYING:
        return _PALLIATIVE, True
    if progressing_on_treatment(state):
        advanced = stage_group(stage) in ("III", "IV")
        return (_SECOND_LINE[state.treatment == "inmuno"] if advanced else _REEVALUATION), True
    step = next_step(state, stage)
    return (_NEXT_STEP[step] if step else None), False


def _recommendation_sentence(
    passages: list[tuple[int, str]], *, prefer: re.Pattern[str] | None = None, no_surgery: bool = False
) -> str:
    """The sentence with the strongest hint (_RECOMMENDATION_HINTS) of all the passages, leaving
    out those that say what is not done; among equally strong ones, the first in retrieval order;
    else the last passage's first sentence. Sentences that match `prefer` (_focus) come before
    any other; with `no_surgery`, none that offers surgery is chosen. A caveat that follows it in
    its passage comes with it (_CAVEAT)."""
    candidates = [
        (number, sentence, following)
        for number, text in passages
        for sentence, following in _with_next(sentences(text))
        if not _NEGATED_HINT.search(sentence) and not (no_surgery and _SURGERY.search(sentence))
    ]
    preferred = [c for c in candidates if prefer.search(c[1])] if prefer is not None else []
    if preferred:  # the strongest of them, else the first: before any other passage's
        candidates = preferred
    for hints in _RECOMMENDATION_HINTS:
        for number, sentence, following in candidates:
            lowered = sentence.lower()
            if any(hint in lowered for hint in hints):
                return _cited(sentence, following, number)
    if preferred:
        return _cited(*preferred[0])
    number, text = passages[-1]
    return f"{sentences(text)[0]} [{number}]"


def _with_next(found: list[str]) -> list[tuple[str, str]]:
    """Each sentence with the one after it ("" for the last)."""
    return list(zip(found, [*found[1:], ""], strict=True))


def _cited(sentence: str, following: str, number: int) -> str:
    """The recommendation with its caveat when the next sentence is one, then its citation."""
    text = f"{sentence} {following}" if following and _CAVEAT.search(following) else sentence
    return f"{text} [{number}]"
