"""Lexical retrieval: BM25 over accent-folded, lowercased Spanish tokens.

The English MiniLM encoder misses many Spanish medical terms; exact words (drug names, "EGFR",
"ECOG", "microcítico") are what a student types, so BM25 carries most of the ranking. The index
is built from the passages in memory at start-up: a few hundred passages take milliseconds.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pulmomed_edge.corpus import Passage

# Function words and question words a student's question carries but that say nothing of the topic.
_STOPWORDS_TEXT = """
    a al algo algun alguna algunas alguno algunos ante antes aqui asi aun bajo bien cada casi como con
    contra cual cuales cualquier cuando cuanto cuanta cuantos cuantas de del desde donde dos durante e
    el ella ellas ellos en entre era eran es esa esas ese eso esos esta estan estar estas este esto
    estos fue fueron ha habia han hasta hay la las le les lo los mas me mi mis muy ni no nos o otra
    otras otro otros para pero poco por porque puede pueden que quien quienes se segun ser si sido
    sin sobre son su sus tambien tan tanto te tiene tienen toda todas todo todos tras tu tus un una
    unas uno unos y ya yo
    hace hacer debe deben deberia sirve usa usan utiliza utilizan existe existen significa
    explica explicame dime dame quiero saber favor cosa cosas tipo tipos forma manera
    hago haces hacen pasa pasan ocurre ocurren sale salen tengo tienes tenemos puedo puedes podemos
    podria podrian sirven alguien ademas solo vez veces entonces luego mejor peor mucho mucha muchos
    muchas bueno buena malo mala normal siempre nunca ahora hoy dia
"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
# Colloquial names a student types, folded onto the corpus's own term (before stemming).
SYNONYMS = {
    "tac": "tc",
    "escaner": "tc",
    "scanner": "tc",
    "quimio": "quimioterapia",
    "radio": "radioterapia",
    "inmuno": "inmunoterapia",
    "tratar": "tratamiento",  # the infinitive keeps its ending: "estadio IV … tratamiento" missed "tratar"
}
_TOKEN = re.compile(r"[a-z0-9]+")
# Spellings of one term, rewritten (on folded text, before tokenising) to the corpus's own.
_PHRASES = (
    (re.compile(r"\bcelulas\s+no\s+pequenas\b"), "no microcitico"),
    (re.compile(r"\bcelulas\s+pequenas\b"), "microcitico"),
    (re.compile(r"\b(?:cpcnp|nsclc)\b"), "cpnm"),  # Spanish and English for CPNM
    (re.compile(r"\bsclc\b"), "microcitico"),
    (re.compile(r"\bpd[\s-]?l1\b"), "pd-l1"),
    (re.compile(r"\bpd[\s-]?1\b"), "pd-1"),
)
# "no microcítico" (NSCLC) is one term: without it, "no" is dropped and NSCLC reads as small-cell.
_NOT_SMALL_CELL = re.compile(r"\bno[\s-]+(microcitic)")
# Roman numerals kept although one letter long: "estadio I" must not read as plain "estadio".
_ROMAN_LETTERS = frozenset("iv")
# A TNM stage with a sub-stage: "ia1" → also "ia" and "i", so "estadio IA" finds "IA1, IA2, IA3".
_SUBSTAGE = re.compile(r"((?:i{1,3}|iv)[abc])[123]?")
# Derivational endings, longest first; one is stripped after the plural, keeping ≥ 4 letters.
_SUFFIXES = (
    "amiento", "imiento", "amente", "acion", "icion", "ador", "idad",
    "ivo", "iva", "ico", "ica", "ado", "ada", "ido", "ida", "al",
)  # fmt: skip
_MIN_STEM = 4
_VOWELS = "aeiou"


def fold(text: str) -> str:
    """Lowercase and strip accents: 'Cáncer Microcítico' → 'cancer microcitico'."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def stem(token: str) -> str:
    """A light Spanish stem: plural, then one ending, then a final vowel: 'tumores'/'tumoral' → 'tumor'."""
    if token.isdigit():
        return token
    if token.endswith("es") and len(token) >= 5 and token[-3] not in _VOWELS:
        token = token[:-2]
    elif token.endswith("s") and len(token) >= 4:
        token = token[:-1]
    for suffix in _SUFFIXES:
        if token.endswith(suffix) and len(token) - len(suffix) >= _MIN_STEM:
            token = token[: -len(suffix)]
            break
    if len(token) > _MIN_STEM and token[-1] in _VOWELS:
        token = token[:-1]
    return token


def normalize_phrases(folded: str) -> str:
    """Rewrite the spellings of one term to the corpus's: 'celulas no pequenas' → 'nomicrocitico',
    'pdl1' → 'pd-l1', 'nsclc' → 'cpnm'. `folded` is text already passed through `fold`."""
    for pattern, replacement in _PHRASES:
        folded = pattern.sub(replacement, folded)
    return _NOT_SMALL_CELL.sub(r"no\1", folded)


def stage_tokens(token: str) -> tuple[str, ...]:
    """A stage token and the broader stages it belongs to: 'ia1' → ('ia1', 'ia', 'i'),
    'iiib' → ('iiib', 'iii'); any other token → (token,)."""
    match = _SUBSTAGE.fullmatch(token)
    if match is None:
        return (token,)
    return tuple(dict.fromkeys((token, match.group(1), match.group(1)[:-1])))


def _is_word(token: str) -> bool:
    """Worth indexing: not a stopword, and longer than one letter unless a digit or a roman numeral."""
    return token not in STOPWORDS and (len(token) > 1 or token.isdigit() or token in _ROMAN_LETTERS)


def tokenize(text: str, *, stemming: bool = True) -> list[str]:
    """Folded, stopword-free (optionally stemmed) tokens of `text`, stages expanded."""
    words = (SYNONYMS.get(t, t) for t in _TOKEN.findall(normalize_phrases(fold(text))))
    tokens = [expanded for t in words if _is_word(t) for expanded in stage_tokens(t)]
    if not stemming:
        return tokens
    stems = (stem(t) for t in tokens)
    return [s for s in stems if s not in STOPWORDS]  # 'mejores' → 'mejor', a stopword too


class LexicalIndex:
    """BM25 over each passage's title, topics and text."""

    def __init__(self, passages: Sequence[Passage], *, stemming: bool = True) -> None:
        import bm25s  # imported here: scipy comes with it and costs import time

        self._stemming = stemming
        self._size = len(passages)
        docs = [tokenize(lexical_text(p), stemming=stemming) for p in passages]
        self._bm25 = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
        self._vocab: set[str] = set()
        # bm25s cannot index passages without a single word (only stopwords): every score stays 0.
        if any(docs):
            self._bm25.index(docs, show_progress=False)
            self._vocab = set(self._bm25.vocab_dict)
        self._doc_terms = [set(doc) for doc in docs]
        df: dict[str, int] = {}
        for terms in self._doc_terms:
            for term in terms:
                df[term] = df.get(term, 0) + 1
        self._idf = {term: _idf(count, self._size) for term, count in df.items()}
        # A word the corpus never uses weighs like a rare one: "mundial" alone must not ground "fútbol".
        self._unknown_idf = _idf(1, self._size)

    def __len__(self) -> int:
        return self._size

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for `query` (zeros when no query word is in the corpus)."""
        tokens = [t for t in tokenize(query, stemming=self._stemming) if t in self._vocab]
        if not tokens:
            return np.zeros(self._size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Top-k (passage_idx, bm25_score) with a positive score, best first."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]

    def coverage(self, query: str, idx: int) -> float:
        """IDF-weighted share of the query's terms that occur in passage `idx` (0..1)."""
        terms = set(tokenize(query, stemming=self._stemming))
        if not terms:
            return 0.0
        weights = {t: self._idf.get(t, self._unknown_idf) for t in terms}
        matched = sum(w for t, w in weights.items() if t in self._doc_terms[idx])
        return matched / sum(weights.values())


def _idf(df: int, n: int) -> float:
    return float(np.log(1.0 + (n - df + 0.5) / (df + 0.5)))


def lexical_text(passage: Passage) -> str:
    """What BM25 sees for a passage: title, topics and text."""
    return " ".join((passage.titulo, " ".join(passage.temas), passage.texto))
