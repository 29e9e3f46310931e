"""Withhold answer sentences the retrieved sources do not support.

A small model restates the passages in its prompt well but, asked for advice the passages do not
give, invents it ("medicamentos como azúcar o tetrabacter" for radiation esophagitis). Such
sentences bring words that appear nowhere in what the model was shown. So each generated sentence
is compared, term by term, with its support: the system prompt, the retrieved passages (whole, as
the citations point to them), the case's goals and the student's state. A sentence with
`MAX_NOVEL` or more terms found in none of them, and at least a quarter of its terms, is withheld;
a section left empty is replaced by the grounded extractive section. Paraphrase with ordinary
words passes (function words and discourse verbs are ignored), which is why the check is per
sentence and needs two new terms, not one.

This catches invention, not every error: a sentence built from the sources' own words can still
misapply them (an adjuvant treatment for a case that does not need it). Some such errors are
checked on their own: a sentence that puts the patient in a stage other than theirs
(`misstates_stage`), one that turns the simulator's resistance model around
(`inverts_resistance`), one that calls the cancer small-cell (`calls_small_cell`), one that
puts the patient "en estado de" something (`glues_state`), and one that puts the patient where
only their tumour can be («El paciente está en el tórax», `misplaces_patient`). A sentence that
breaks off on a word that cannot end one («…el nervio frénico o.») is withheld too (`breaks_off`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .extractive import sentences
from .lexical import fold, stem, tokenize
from .prompts import SENTENCE_BREAK, SYSTEM_PROMPT, Sections

MAX_NOVEL = 2  # unsupported terms that withhold a sentence…
MIN_NOVEL_SHARE = 0.25  # …if they are also this share of its terms (a long paraphrase may pass)
_MIN_TERM = 4  # shorter stems ("mas", "vez") carry no claim; numbers always count
_CITATION = re.compile(r"\[\d+(?:\s*,\s*\d+)*\]")
_SENTENCE_ENDS = (".", "!", "?")

# Words an explanation uses to talk about the case rather than to claim something about it.
_DISCOURSE_TEXT = """
    encuentra encuentran encontrar describe describen descrito descrita considera consideran
    considerar consideraria considerarian consideramos recomienda recomiendan recomendar
    recomendado recomendada recomendacion utilizar utilizando utilizado utilizada uso usar usando
    indica indican indicar incluye incluyen incluir estado actual actualmente aproximadamente
    aproximado aproximada caso paciente pacientes simulado simulada simulacion importante
    mientras debido traves parte dentro llamado llamada mediante respecto general generalmente
    principal principalmente posible posibles necesario necesaria objetivo primero primera
    segundo segunda explicacion ocurre ocurrir significa muestra muestran presenta presentan
    corresponde corresponden relacion relacionado relacionada
"""
_DISCOURSE = frozenset(stem(w) for w in _DISCOURSE_TEXT.split())


def terms(text: str) -> list[str]:
    """The claim-bearing terms of a text: folded, stemmed, without function or discourse words."""
    tokens = tokenize(_CITATION.sub(" ", text))
    return [t for t in tokens if t.isdigit() or (len(t) >= _MIN_TERM and t not in _DISCOURSE)]


def says_nothing(sentence: str) -> bool:
    """A sentence without one word that carries meaning: an enumerator ("1."), "Sí.", a bare
    citation. The small models write them; they are dropped (not withheld) and never make a
    section on their own."""
    return all(t.isdigit() for t in terms(sentence))


def support_of(texts: Iterable[str]) -> frozenset[str]:
    """Every term the model was shown (a term is supported if any of the texts has it)."""
    found: set[str] = set()
    for text in texts:
        found.update(tokenize(text))
    return frozenset(found)


def novel_terms(sentence: str, support: frozenset[str]) -> list[str]:
    """The sentence's terms that appear in none of the supporting texts, each once."""
    return list(dict.fromkeys(t for t in terms(sentence) if t not in support))


def unsupported(
    sentence: str,
    support: frozenset[str],
    *,
    max_novel: int = MAX_NOVEL,
    stage: str | None = None,
    patient: frozenset[str] | None = None,
) -> bool:
    """Whether the sentence is withheld: it brings enough terms of its own, or it gives the patient
    a stage other than `stage` (misstates_stage), or it only strings together the terms of the
    patient line (`patient`, its terms; None: not checked; restates_patient), or it breaks one of
    the other rules (module docstring)."""
    return misplaces_patient(sentence) or _misclaims(
        sentence, support, max_novel=max_novel, stage=stage, patient=patient
    )


def _misclaims(
    sentence: str,
    support: frozenset[str],
    *,
    max_novel: int,
    stage: str | None,
    patient: frozenset[str] | None,
) -> bool:
    """`unsupported` but for `misplaces_patient`: a claim of the sentence the sources do not make
    (what a next sentence written after it may build on)."""
    if misstates_stage(sentence, stage) or inverts_resistance(sentence):
        return True
    if calls_small_cell(sentence) or glues_state(sentence) or breaks_off(sentence):
        return True
    if patient is not None and restates_patient(sentence, patient):
        return True
    novel = len(novel_terms(sentence, support))
    return novel >= max_novel and novel >= MIN_NOVEL_SHARE * len(set(terms(sentence)))


def restates_patient(sentence: str, patient: frozenset[str]) -> bool:
    """Whether every term of the sentence is one of the patient line's (`patient`): «El paciente
    está en estado pulmonar crítico, ya que su edad es 50-59 años» says nothing a source does,
    and every word was in the prompt, so the term check passed it. 5 of 43 sentences of the
    default model's explanations (24 answers read) were such strings of the patient's labels; the
    summary that stands in for an emptied section opens with the patient's state anyway."""
    found = terms(sentence)
    return bool(found) and all(t in patient for t in found)


# a stage's group and letter ("IV", "IIB", "IA2"), then where it is found: after "estadio(s)" or
# "fase(s)" in a sentence (the model says «el paciente está en fase IV» too; but «un ensayo de
# fase III» is a trial's phase, as the passages use it), anywhere in a stage's own text
_ROMAN_STAGE = r"(IV|I{1,3})([ABC])?(?![A-Za-z])"
_STAGE_MENTION = re.compile(r"\b(?:[Ee]stadios?|(?<!de )[Ff]ases?)\s+" + _ROMAN_STAGE)
# a stage in brackets after the tumour it names: «Su tumor es de más de 4 y hasta 5 cm sin
# ganglios (IIA)» for a stage IIB patient
_BRACKETED_STAGE = re.compile(r"\((IV|I{1,3})([ABC])?\)")
_STAGE = re.compile(r"(?<![A-Za-z])" + _ROMAN_STAGE)
# one patient, or their tumour ("el tumor en estadio IB…" is as much about them)
_ONE_PATIENT = re.compile(r"\b(?:paciente|enfermo|enferma|(?:el|su|este)\s+tumor)\b", re.IGNORECASE)
# words that speak of a case's past (an operated earlier stage)
_HISTORY = re.compile(r"\b(?:operad[oa]|cirug[ií]a|resecad[oa]|resecci[oó]n|reca[ií]d[ao])", re.IGNORECASE)


def misstates_stage(sentence: str, stage: str | None) -> bool:
    """Whether a sentence about the patient names a stage that is not theirs.

    Every word of "El paciente se encuentra en el estadio IV" is in the passages a stage IIB
    student is shown, so the term check lets it through; the small model writes such sentences.
    A sentence that speaks of one patient or their tumour (not of "pacientes" in general, as
    trials do) and names a stage must name one of the patient's: the same group (I, II, III, IV),
    and the same letter when both give one. `stage` may name an earlier one too ("IV (recaída de
    un IB operado)"): that one only in a sentence about the case's history (operated, relapse);
    "El tumor en estadio IB…" for this patient is wrong. "IIIA+" (T4 or more advanced, the API's
    volume bands) takes III and IV. None: nothing to check."""
    if not stage or not _ONE_PATIENT.search(sentence):
        return False
    own = _STAGE.findall(stage if _HISTORY.search(sentence) else stage.split("(")[0])
    if not own:
        return False
    open_ended = stage.split(" ")[0].endswith("+")

    def theirs(group: str, letter: str) -> bool:
        if open_ended and group in ("III", "IV"):
            return True
        return any(group == g and (not letter or not lt or letter == lt) for g, lt in own)

    named = _STAGE_MENTION.findall(sentence) + _BRACKETED_STAGE.findall(sentence)
    return not all(theirs(group, letter) for group, letter in named)


# resistant cells said to respond (the very thing they do not do), unless denied
_RESPONDING = re.compile(r"\bresistentes?\b.*\brespond|\brespond.*\bresistentes?\b", re.IGNORECASE)
_DENIED = re.compile(r"\b(?:no|ni|sin|nunca|apenas)\b", re.IGNORECASE)
# the two populations swapped: «La células resistentes forman el volumen sensible»
_SWAPPED_POPULATIONS = re.compile(
    r"\bresistentes?\s+(?:forman|constituyen|componen)\s+el\s+volumen\s+sensible\b"
    r"|\bsensibles?\s+(?:forman|constituyen|componen)\s+el\s+volumen\s+resistente\b",
    re.IGNORECASE,
)
# a treatment given to raise or remove the resistant clones (it removes the sensitive ones; the
# resistant ones are what survives it)
_AIMED_AT_RESISTANCE = re.compile(
    r"\bpara\s+(?:aumentar|eliminar|destruir)\s+(?:el\s+número\s+de\s+|las\s+|los\s+)?"
    r"(?:células|clones)\s+resistentes\b",
    re.IGNORECASE,
)


def inverts_resistance(sentence: str) -> bool:
    """Whether a sentence turns the simulator's resistance model around: resistant cells that
    respond to treatment, a treatment given to raise or to remove them, or the resistant cells
    forming the sensitive volume. Built from the passages' own words, such sentences pass the
    term check, and the small model writes them ("Los clones resistentes son los clones de las
    células que responden a la radioterapia")."""
    responding = _RESPONDING.search(sentence) and not _DENIED.search(sentence)
    return bool(responding or _AIMED_AT_RESISTANCE.search(sentence) or _SWAPPED_POPULATIONS.search(sentence))


# «en estado de …»: no passage and no patient line says it (the patient line has «estado pulmonar
# …»); the small model glues the patient to whatever noun follows
_IN_STATE_OF = re.compile(r"\ben\s+(?:un\s+)?estado\s+de\b", re.IGNORECASE)

# the patient put in a place or a thing: «El paciente está en el tórax», «…se encuentra en un tumor
# de hasta 4 cm»; the word after «en» (and an article) is where
_PATIENT_IN = re.compile(
    r"^(?:el|este)\s+paciente\s+(?:está|se\s+encuentra)(?:\s+aproximadamente)?\s+en\s+"
    r"(?:(?:el|la|los|las|un|una)\s+)?(\w+)",
    re.IGNORECASE,
)
# fmt: off
_NOT_WHERE_A_PATIENT_IS = frozenset({
    "torax", "pulmon", "mediastino", "region", "lugar", "zona", "posicion",
    "tumor", "tumores", "nodulo", "cancer", "cpnm", "carcinoma", "adenocarcinoma",
})
# fmt: on


# words a Spanish sentence cannot end on: conjunctions, prepositions, articles
# fmt: off
_DANGLING = frozenset({
    "o", "u", "y", "e", "ni", "que",
    "de", "del", "a", "al", "en", "con", "por", "para", "sin", "sobre", "entre", "hasta", "desde",
    "el", "la", "los", "las", "un", "una", "unos", "unas", "su", "sus",
})
# fmt: on


def breaks_off(sentence: str) -> bool:
    """Whether a sentence ends on a word no sentence ends on («…el nervio frénico o.»): the model
    copied a long passage sentence and stopped inside it, and the period made it look whole."""
    words = re.findall(r"\w+", _CITATION.sub(" ", sentence).lower())
    return bool(words) and words[-1] in _DANGLING


def glues_state(sentence: str) -> bool:
    """Whether a sentence puts the patient «en estado de» something: read in real answers, it was
    always a label glued to an unrelated noun («El paciente está en estado de cirugía debido a la
    enfermedad localmente avanzada» for an inoperable case; «…en estado de radioterapia»; «…en
    estado de cáncer de pulmón no microcítico»), and every word of it was in the prompt."""
    return bool(_IN_STATE_OF.search(sentence))


def misplaces_patient(sentence: str) -> bool:
    """Whether a sentence puts the patient in a place or a thing where only their tumour can be:
    «El paciente está en el tórax, con un cáncer de pulmón no microcítico avanzado (estadio IV)»
    (23 of the 920 model answers of the fifteenth round's six class runs), «…está en un tumor de
    hasta 4 cm», «…está en el cáncer de pulmón no microcítico». Every word is the passages', so the
    term check passed them; a reviewer read them as nonsense. The patient in a stage, a treatment
    or a follow-up is not this. «El paciente se describe con dos poblaciones: …» is not caught: the
    same review read what follows the colon as correct teaching, and an answer without it as
    poorer."""
    found = _PATIENT_IN.match(" ".join(sentence.split()))
    return bool(found) and fold(found.group(1)) in _NOT_WHERE_A_PATIENT_IS


# «microcítico» not preceded by «no»: the lexical tokens fold «no microcítico» into one term, so a
# bare «microcítico» is a claim of its own
_SMALL_CELL = re.compile(r"(?<!\bno )\bmicroc[ií]tic[oa]s?\b", re.IGNORECASE)


_TRANSFORMED = re.compile(r"\btransforma", re.IGNORECASE)


def calls_small_cell(sentence: str) -> bool:
    """Whether a sentence about the patient or their tumour calls the cancer small-cell
    («microcítico» without «no»). Every patient of the simulator has a non-small-cell cancer; the
    default model wrote «el tumor es microcítico debido a la mutación de EGFR», and with a passage
    that happens to use «tamaño» every other term of it was supported. Sentences about the kinds
    of lung cancer in general, and a transformation to small-cell under a targeted drug (a
    resistance mechanism the passages teach), are not this claim."""
    sentence = " ".join(sentence.split())
    return bool(
        _SMALL_CELL.search(sentence) and _ONE_PATIENT.search(sentence) and not _TRANSFORMED.search(sentence)
    )


class SentenceGate:
    """Streams an answer a whole sentence at a time, leaving out the sentences the check would
    withhold, so a student never sees one that `done` then takes back.

    feed() takes the section deltas of `SectionTracker` and returns the deltas to send; finish()
    returns the last sentences once the answer is complete. A trailing unfinished sentence is
    never sent (the final answer drops it too)."""

    def __init__(
        self, support: frozenset[str], stage: str | None = None, *, patient: frozenset[str] | None = None
    ) -> None:
        self.support = support
        self.stage = stage
        self.patient = patient
        self._pending = {"explicacion": "", "recomendacion": ""}
        self._sent = {"explicacion": 0, "recomendacion": 0}

    def feed(self, section: str, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if section == "recomendacion":  # the explanation is over: its last sentence is whole
            out += self._close("explicacion")
        self._pending[section] += text
        while match := SENTENCE_BREAK.search(self._pending[section]):
            sentence = self._pending[section][: match.start()]
            self._pending[section] = self._pending[section][match.end() :]
            out += self._release(section, sentence)
        return out

    def finish(self) -> list[tuple[str, str]]:
        return self._close("explicacion") + self._close("recomendacion")

    def _close(self, section: str) -> list[tuple[str, str]]:
        rest, self._pending[section] = self._pending[section].strip(), ""
        return self._release(section, rest) if rest.endswith(_SENTENCE_ENDS) else []

    def _release(self, section: str, sentence: str) -> list[tuple[str, str]]:
        sentence = " ".join(sentence.split())
        if not is_kept(sentence, self.support, stage=self.stage, patient=self.patient):
            return []
        self._sent[section] += 1
        return [(section, sentence if self._sent[section] == 1 else " " + sentence)]


def is_kept(
    sentence: str, support: frozenset[str], *, stage: str | None = None, patient: frozenset[str] | None = None
) -> bool:
    """Whether a sentence reaches the student: it says something, and the check does not withhold
    it (the sentence stream and a Phase's `keeps` ask this; ground_sections tells the two apart)."""
    return not says_nothing(sentence) and not unsupported(sentence, support, stage=stage, patient=patient)


def keeps_a_sentence(
    text: str, support: frozenset[str], *, stage: str | None = None, patient: frozenset[str] | None = None
) -> bool:
    """Whether text has a whole sentence the check would keep (a Phase's `keeps`, asked of each
    sentence the model ends: the engine takes a rejected one back and writes it again, and lets a
    section with none to keep write another)."""
    return any(is_kept(s, support, stage=stage, patient=patient) for s in _whole_sentences(text))


def _whole_sentences(text: str) -> list[str]:
    """The sentences of text that are finished (a trailing unfinished one is never judged)."""
    return [s for s in sentences(text) if s.endswith(_SENTENCE_ENDS)]


def worth_retrying(
    text: str, support: frozenset[str], *, stage: str | None = None, patient: frozenset[str] | None = None
) -> bool:
    """Whether a text `keeps_a_sentence` rejects is taken back and written again (a Phase's
    `retries`): not when each of its whole sentences is withheld only for misplacing the patient
    («El paciente está en el tórax, …»). Such a sentence is withheld and the model goes on after
    it: what it writes next does not build on it («Se recomienda mantenerlo y evaluar la respuesta
    con la misma técnica de imagen…»). Written again instead, the small model's next most likely
    first sentence was a worse one («El paciente de 71 años, exfumador de 38 paquetes-año, con
    estado general limitado (ECOG 2: …» broken off), and the good sentence after it was lost."""
    whole = _whole_sentences(text)
    return not whole or any(
        says_nothing(s) or _misclaims(s, support, max_novel=MAX_NOVEL, stage=stage, patient=patient)
        for s in whole
    )


@dataclass(frozen=True)
class Grounded:
    sections: Sections
    withheld: list[str]  # the sentences taken out, for the log and the reading panel
    kept: int  # the model's sentences left in (0: the whole answer is the fallback's)
    filled: tuple[str, ...] = ()  # the sections left with none, now the fallback's


def ground_sections(
    answer: Sections,
    support: frozenset[str],
    fallback: Sections,
    *,
    max_novel: int = MAX_NOVEL,
    stage: str | None = None,
    patient: frozenset[str] | None = None,
) -> Grounded:
    """The answer without the sentences `unsupported` withholds; an emptied section becomes the
    fallback's (and is named in `filled`)."""
    withheld: list[str] = []
    texts: dict[str, str] = {}
    filled: list[str] = []
    kept = 0
    for name in ("explicacion", "recomendacion"):
        good = []
        for sentence in sentences(getattr(answer, name)):
            if says_nothing(sentence):
                continue
            if unsupported(sentence, support, max_novel=max_novel, stage=stage, patient=patient):
                withheld.append(sentence)
            else:
                good.append(sentence)
        texts[name] = " ".join(good) if good else getattr(fallback, name)
        kept += len(good)
        if not good:
            filled.append(name)
    return Grounded(Sections(texts["explicacion"], texts["recomendacion"]), withheld, kept, tuple(filled))


def evaluate(passages: Mapping[str, str], path: Path) -> dict:
    """`eval grounding`: each sentence checked against the system prompt and its named passages
    (the support a prompt with those passages gives), and how often that matched `expected`."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        support = support_of([SYSTEM_PROMPT, *(passages[p] for p in case["passages"])])
        verdict = "withheld" if unsupported(case["sentence"], support) else "kept"
        rows.append({**case, "verdict": verdict, "novel": novel_terms(case["sentence"], support)})
    judged = [r for r in rows if "expected" in r]
    return {
        "sentences": len(rows),
        "withheld": sum(r["verdict"] == "withheld" for r in rows),
        "as_expected": sum(r["verdict"] == r["expected"] for r in judged),
        "judged": len(judged),
        "rows": rows,
    }
