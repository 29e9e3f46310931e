"""The canonical state, the prompt's shape, section parsing and the response cache."""

from __future__ import annotations

import pytest

from pulmomed_edge.cache import ResponseCache
from pulmomed_edge.canonical import cache_key, canonicalize
from pulmomed_edge.prompts import SectionTracker, complete_sentences, split_sections, tighten
from pulmomed_edge.schema import SimulationState, approximate_stage, parse_state


def state(**fields) -> SimulationState:
    return parse_state({"edad": 55, "volumen_tumor_sensible": 5.0, **fields}, frozenset())


@pytest.mark.parametrize(
    ("volume", "stage"),
    [
        (0.0, "IA (T1a)"),
        (2.99, "IA (T1a)"),
        (3.0, "IB (T2a)"),
        (13.9, "IB (T2a)"),
        (14, "IIA (T2b)"),
        (27.9, "IIA (T2b)"),
        (28, "IIB (T3)"),
        (64.9, "IIB (T3)"),
        (65, "IIIA+ (T4 o avanzado)"),
    ],
)
def test_stage_thresholds_follow_the_contract(volume, stage):
    assert approximate_stage(volume) == stage


def test_stage_uses_sensitive_plus_resistant_volume():
    assert canonicalize(state(volumen_tumor_sensible=2.0, volumen_tumor_resistente=1.5)).stage == "IB (T2a)"


def test_smoking_status_never_ex_current():
    assert canonicalize(state()).smoking == "nunca"
    assert canonicalize(state(pack_years=30)).smoking == "exfumador"
    assert canonicalize(state(es_fumador=True, pack_years=30)).smoking == "fumador"


def test_same_buckets_same_key_and_any_bucket_change_changes_it():
    base = canonicalize(state(edad=51, pack_years=31))
    assert cache_key(base, ["a"], "m", "i") == cache_key(
        canonicalize(state(edad=58, pack_years=45)), ["a"], "m", "i"
    )
    for changed in (
        state(edad=61, pack_years=31),
        state(edad=51, pack_years=55),
        state(edad=51, pack_years=31, dieta="mala"),
        state(edad=51, pack_years=31, volumen_tumor_sensible=20.0),
        state(edad=51, pack_years=31, volumen_tumor_resistente=3.0),
        state(edad=51, pack_years=31, tratamiento_activo="radio"),
        state(edad=51, pack_years=31, lung_state="critico"),
    ):
        assert cache_key(canonicalize(changed), ["a"], "m", "i") != cache_key(base, ["a"], "m", "i")
    assert cache_key(base, ["a"], "m", "i") != cache_key(base, ["b"], "m", "i")
    assert cache_key(base, ["a"], "m", "i") != cache_key(base, ["a"], "m2", "i")
    assert cache_key(base, ["a"], "m", "i") != cache_key(base, ["a"], "m", "i2")


def test_tighten_keeps_whole_sentences():
    text = "Primera frase corta. " + "palabra " * 80 + "fin. Tercera."
    assert tighten(text, 10) == "Primera frase corta."


def test_complete_sentences_drops_an_unfinished_tail():
    assert complete_sentences("Uno. Dos tres") == "Uno."
    assert complete_sentences("Solo una frase sin punto") == "Solo una frase sin punto."
    assert complete_sentences("Bien.") == "Bien."


def test_split_sections_needs_both():
    assert split_sections(" El tumor crece.\nRecomendación: Cirugía.").recomendacion == "Cirugía."
    assert split_sections(" Solo explicación.") is None


def test_section_tracker_never_leaks_the_label_even_split_across_pieces():
    tracker = SectionTracker()
    out = []
    for piece in [" El tumor", " crece.", "\nRecom", "endación", ":", " Operar", "."]:
        out += tracker.feed(piece)
    expl = "".join(t for s, t in out if s == "explicacion")
    rec = "".join(t for s, t in out if s == "recomendacion")
    assert expl == "El tumor crece."
    assert rec == "Operar."


def test_cache_lru_and_ttl():
    now = [0.0]
    cache: ResponseCache[str] = ResponseCache(2, 10.0, clock=lambda: now[0])
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"
    cache.put("c", "C")  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") == "C"
    now[0] = 11.0
    assert cache.get("a") is None
    assert cache.stats()["hits"] == 2


def test_cache_size_zero_disables_it():
    cache: ResponseCache[str] = ResponseCache(0, 10.0)
    cache.put("a", "A")
    assert cache.get("a") is None


def test_the_patient_line_is_plain_spanish_without_diet():
    """The model copies the patient line: labels such as "células resistentes 0 %" came back as
    "la célula resistentes es 0 %", and "dieta mala" drew invented diet advice."""
    from pulmomed_edge.prompts import patient_line

    none = canonicalize(state(edad=64, volumen_tumor_sensible=20.0, dieta="mala"))
    line = patient_line(none, None)
    assert line.startswith("Paciente: estadio aproximado ") and "sin células resistentes" in line
    assert "dieta" not in line and "edad 60-69 años" in line
    some = canonicalize(state(edad=64, volumen_tumor_sensible=20.0, volumen_tumor_resistente=5.0))
    assert "células resistentes: 10-30 % del tumor" in patient_line(some, None)
