"""The grounding check on real corpus passages and sentences the default model really wrote."""

import pytest

from pulmomed_edge.config import KNOWLEDGE_DIR
from pulmomed_edge.corpus import load_corpus
from pulmomed_edge.grounding import ground_sections, novel_terms, support_of, unsupported
from pulmomed_edge.prompts import SYSTEM_PROMPT, Sections


@pytest.fixture(scope="module")
def passages():
    return {p.id: p.texto for p in load_corpus(KNOWLEDGE_DIR / "corpus")}


@pytest.fixture(scope="module")
def esophagitis(passages):
    return support_of([SYSTEM_PROMPT, passages["rt-esofagitis-01"], "Paciente: radioterapia, 45 días."])


# written by Qwen2.5-Coder-0.5B for a state whose passages included rt-esofagitis-01
INVENTED = (
    "Para este paciente, consideraría un tratamiento para la esofagitis rápida, como el uso de "
    "medicamentos como azúcar o tetrabacter."
)


def test_invented_advice_is_withheld_and_restated_sources_pass(esophagitis):
    assert {"azucar", "tetrabacter"} <= set(novel_terms(INVENTED, esophagitis))
    assert unsupported(INVENTED, esophagitis)
    # the passage's own advice, reworded with ordinary words and cited
    restated = "Se maneja con medidas de soporte como analgesia, anestésicos locales y una dieta blanda [1]."
    assert novel_terms(restated, esophagitis) == []
    assert not unsupported(restated, esophagitis)
    # one new word is a paraphrase, not an invention
    assert not unsupported("La esofagitis rádica suele mejorar tras acabar la radioterapia.", esophagitis)


def test_numbers_count_but_citations_do_not(esophagitis):
    assert novel_terms("La esofagitis aparece tras algunas semanas [1].", esophagitis) == []
    assert "73" in novel_terms("La esofagitis afecta al 73 % de los pacientes.", esophagitis)


def test_an_emptied_section_becomes_the_grounded_fallback(esophagitis):
    answer = Sections(
        explicacion="La esofagitis rádica es un efecto adverso agudo de la radioterapia torácica [1]. "
        "Se cura tomando zumo de naranja y vitaminas importadas.",
        recomendacion=INVENTED,
    )
    fallback = Sections("explicación de respaldo.", "Se maneja con medidas de soporte [1].")
    grounded = ground_sections(answer, esophagitis, fallback)
    assert grounded.sections.explicacion == (
        "La esofagitis rádica es un efecto adverso agudo de la radioterapia torácica [1]."
    )
    assert grounded.sections.recomendacion == fallback.recomendacion
    assert len(grounded.withheld) == 2 and INVENTED in grounded.withheld
    assert grounded.kept == 1


def test_an_answer_with_no_supported_sentence_keeps_none(esophagitis):
    answer = Sections(
        explicacion="Se cura tomando zumo de naranja y vitaminas importadas.", recomendacion=INVENTED
    )
    fallback = Sections("explicación de respaldo.", "Se maneja con medidas de soporte [1].")
    grounded = ground_sections(answer, esophagitis, fallback)
    assert grounded.sections == fallback and grounded.kept == 0 and len(grounded.withheld) == 2


def test_immunotherapy_answer_sentences_from_the_default_model(passages):
    """Two sentences of one real answer to an immunotherapy state: the restatement stays."""
    support = support_of([SYSTEM_PROMPT, passages["inmuno-mecanismo-01"], "Paciente: inmunoterapia."])
    kept = (
        "La inmunoterapia del cáncer de pulmón no microcítico (CPNM) usa inhibidores de puntos de "
        "control inmunitario."
    )
    withheld = "El paciente debe tomar una dieta saludable, como alimentos frescos y leguminosos."
    assert not unsupported(kept, support)
    assert unsupported(withheld, support)


def test_sentence_gate_streams_whole_checked_sentences_only(esophagitis):
    from pulmomed_edge.grounding import SentenceGate

    explanation = (
        "La esofagitis rádica es un efecto adverso agudo de la radioterapia torácica [1]. "
        "Se cura tomando zumo de naranja y vitaminas importadas. Aparece tras algunas semanas."
    )
    recommendation = "Se maneja con analgesia y dieta blanda [1]. " + INVENTED + " Y además"
    gate = SentenceGate(esophagitis)
    out: list[tuple[str, str]] = []
    for section, text in (("explicacion", explanation), ("recomendacion", recommendation)):
        for i in range(0, len(text), 7):  # the way tokens arrive: a few characters at a time
            out += gate.feed(section, text[i : i + 7])
    assert all(section == "explicacion" for section, _ in out[:2])
    out += gate.finish()
    streamed = {s: "".join(t for sec, t in out if sec == s) for s in ("explicacion", "recomendacion")}
    assert streamed["explicacion"] == (
        "La esofagitis rádica es un efecto adverso agudo de la radioterapia torácica [1]. "
        "Aparece tras algunas semanas."
    )
    # the invented advice is never sent, nor the unfinished sentence the answer ends with
    assert streamed["recomendacion"] == "Se maneja con analgesia y dieta blanda [1]."
