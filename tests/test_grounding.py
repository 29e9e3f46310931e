"""The grounding check on real corpus passages and sentences the default model really wrote."""

import pytest

from pulmomed_edge.config import KNOWLEDGE_DIR
from pulmomed_edge.corpus import load_corpus
from pulmomed_edge.grounding import (
    SentenceGate,
    breaks_off,
    calls_small_cell,
    glues_state,
    ground_sections,
    inverts_resistance,
    keeps_a_sentence,
    misplaces_patient,
    misstates_stage,
    novel_terms,
    restates_patient,
    support_of,
    unsupported,
    worth_retrying,
)
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


def test_a_section_that_says_nothing_is_the_fallbacks_and_the_stream_never_shows_it(esophagitis):
    """The test model once answered "1." for the explanation (an enumerator and nothing after it):
    that was served, and cached, as the model's explanation. Such pieces are dropped, neither
    kept nor withheld, and an emptied section is the grounded one."""
    answer = Sections(
        explicacion="1.",
        recomendacion="2. Se maneja con analgesia y dieta blanda [1].",
    )
    fallback = Sections("explicación de respaldo.", "Se maneja con medidas de soporte [1].")
    grounded = ground_sections(answer, esophagitis, fallback)
    assert grounded.sections.explicacion == fallback.explicacion
    assert grounded.sections.recomendacion == "Se maneja con analgesia y dieta blanda [1]."
    assert grounded.kept == 1 and grounded.withheld == []
    nothing = Sections("1.", "Sí. [1]")
    assert ground_sections(nothing, esophagitis, fallback).kept == 0  # then the answer is a fallback
    gate = SentenceGate(esophagitis)
    out = gate.feed("explicacion", "1. ") + gate.feed("recomendacion", answer.recomendacion) + gate.finish()
    assert out == [("recomendacion", "Se maneja con analgesia y dieta blanda [1].")]


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


@pytest.mark.parametrize(
    ("sentence", "stage", "misstated"),
    [
        # seen in the default model's answers for a IIB (T3) state
        ("El paciente se encuentra en el estadio IV con tumores de más de 4 cm.", "IIB (T3)", True),
        ("El paciente se encuentra en el estadio II del cáncer de pulmón.", "IIB (T3)", False),
        ("El paciente está en el estadio IIB, un tumor T3.", "IIB (T3)", False),
        ("Estadio IA para el paciente, según el volumen.", "IB (T2a)", True),
        ("El paciente está en el estadio I del CPNM.", "IB (T2a)", False),
        # trials speak of patients in general
        ("En LACE, los pacientes en estadio II y III fueron los que más ganaron.", "IA (T1a)", False),
        # T4 or more advanced: III or IV
        ("El paciente está en estadio IV.", "IIIA+ (T4 o avanzado)", False),
        ("El paciente está en estadio IB.", "IIIA+ (T4 o avanzado)", True),
        ("El paciente se encuentra en el estadio IV.", None, False),  # nothing to check
        # a library case's own stage, which may name the earlier one too
        ("El paciente está en estadio IIIA.", "IIIB", True),
        ("El paciente fue operado de un estadio IB.", "IV (recaída a distancia de un IB operado)", False),
        (
            "El paciente tiene una enfermedad en estadio IV.",
            "IV (recaída a distancia de un IB operado)",
            False,
        ),
        ("El paciente está en estadio IIA.", "IV (recaída a distancia de un IB operado)", True),
        # the earlier stage only of the case's history (a real answer to SEER_007 said this)
        ("El paciente está en estadio IB.", "IV (recaída a distancia de un IB operado)", True),
        (
            "El tumor en estadio IB se describe con dos poblaciones.",
            "IV (recaída a distancia de un IB operado)",
            True,
        ),
        ("El tumor está en estadio IV.", "IV (recaída a distancia de un IB operado)", False),
        # their tumour is them too; a tumour in general is not
        ("Su tumor está en estadio IIIA.", "IIB (T3)", True),
        ("Un tumor de más de 7 cm es T4, estadio IIIA.", "IIB (T3)", False),
        ("El paciente tiene un derrame pleural maligno, estadio IVA.", "IVA", False),
        ("El tratamiento del estadio IV es sistémico.", "IIB (T3)", False),  # not about the patient
        # a stage in brackets (the default model's answer to SEER_002, a T2b N1 stage IIB)
        ("Su tumor es de más de 4 y hasta 5 cm sin ganglios (IIA).", "IIB", True),
        ("Su tumor es T2b con ganglios hiliares (IIB).", "IIB", False),
        ("Su tumor afecta a ganglios hiliares (N1).", "IIB", False),  # a node category, not a stage
        # «fase» for the stage, but not a trial's phase (as the passages use the word)
        ("El paciente está en fase IV de la enfermedad.", "IIB (T3)", True),
        ("El paciente está en fase II de la enfermedad.", "IIB (T3)", False),
        ("Para este paciente, un ensayo de fase III (PACIFIC) mostró el beneficio.", "IIB (T3)", False),
    ],
)
def test_a_sentence_giving_the_patient_another_stage_is_withheld(sentence, stage, misstated):
    assert misstates_stage(sentence, stage) is misstated
    # whatever its words: every term of a sentence taken from the support passes the term check
    support = support_of([sentence])
    assert unsupported(sentence, support, stage=stage) is misstated
    gate = SentenceGate(support, stage)
    assert (gate.feed("explicacion", sentence + " ") == []) is misstated
    fallback = Sections("Resumen [1].", "Resumen [1].")
    grounded = ground_sections(Sections(sentence, sentence), support, fallback, stage=stage)
    assert grounded.kept == (0 if misstated else 2)


# Sentences the default model wrote that the term check let through, each caught by its own
# rule, beside sentences the rule must leave alone (often the passages' own)
CAUGHT_BY_RULE = {
    inverts_resistance: [
        # written by the default model (answer review, tenth round)
        ("Los clones resistentes son los clones de las células que responden a la radioterapia.", True),
        ("La quimioterapia clásica se utiliza para aumentar el número de células resistentes.", True),
        ("La quimioterapia se utiliza para eliminar células resistentes.", True),
        # thirteenth round (SEER_006)
        (
            "La células resistentes forman el volumen sensible, mientras los clones resistentes "
            "forman el volumen resistente.",
            True,
        ),
        # the passages' own definition, and what a treatment really does
        (
            "El volumen sensible, formado por células que responden al tratamiento, y el volumen "
            "resistente, formado por clones que no responden.",
            False,
        ),
        ("Las células resistentes no responden a la quimioterapia y sobreviven.", False),
        ("Se da para eliminar las células sensibles; las resistentes sobreviven.", False),
        ("Las células sensibles responden al tratamiento.", False),
    ],
    calls_small_cell: [
        # written by the default model (tests/data/grounding_sentences.jsonl)
        (
            "Se considera que el tumor es microcítico debido a la mutación de EGFR en estadio IIIA.",
            True,
        ),
        ("El paciente tiene un cáncer microcítico.", True),
        ("El cáncer de pulmón no microcítico (CPNM) es el más frecuente.", False),
        # the passages' own: the kinds of lung cancer, a resistance mechanism
        ("El cáncer microcítico es un carcinoma neuroendocrino de alto grado.", False),
        ("Con osimertinib, el tumor puede transformarse en un carcinoma microcítico.", False),
        ("Los tumores no  microcíticos se tratan según su estadio.", False),
        ("El paciente tiene un cáncer de pulmón no microcítico en estadio IIA.", False),
    ],
    glues_state: [
        # written by the default model (answers read in the thirteenth round)
        ("El paciente está en estado de cirugía debido a la enfermedad localmente avanzada del CPNM.", True),
        (
            "El paciente está en estado de cáncer de pulmón no microcítico (CPNM), que se describe "
            "con dos poblaciones.",
            True,
        ),
        ("El paciente está en un estado de radioterapia (menos de 30 días).", True),
        # the patient line's own words, and a general state
        ("El paciente tiene un estado pulmonar estable.", False),
        (
            "Con un estado general malo (ECOG 3–4), el tratamiento se centra en los cuidados paliativos.",
            False,
        ),
    ],
    misplaces_patient: [
        # written by the default model (class runs' answers, fifteenth round)
        ("El paciente está en el tórax, con un cáncer de pulmón no microcítico avanzado (estadio IV).", True),
        ("El paciente se encuentra en un nódulo sólido periférico de 1.8 cm.", True),
        ("El paciente está en un tumor de hasta 4 cm, sin ganglios afectados ni metástasis.", True),
        ("El  paciente está en el cáncer de pulmón no microcítico (CPNM).", True),
        # the patient in a stage, a treatment or a follow-up; the tumour in its place; the two
        # populations, whose content a reviewer read as correct teaching
        ("El paciente se encuentra en el estadio aproximado IIB (T3).", False),
        ("El paciente está en un estadio IV, con metástasis a distancia.", False),
        ("El paciente está en tratamiento con quimioterapia.", False),
        ("El paciente se encuentra aproximadamente en el IIA (T2b).", False),
        ("El tumor está en el tórax, sin metástasis a distancia.", False),
        (
            "El paciente se describe con dos poblaciones: el volumen sensible, formado por células "
            "que responden al tratamiento, y el volumen resistente, formado por clones que no responden.",
            False,
        ),
    ],
    breaks_off: [
        # written by the default model (thirteenth round), copying a passage sentence
        (
            "El paciente se encuentra en el IIB (T3), donde hay tumores T3 sin ganglios, que invaden "
            "la pared torácica, el nervio frénico o.",
            True,
        ),
        ("La quimioterapia se combina con la.", True),
        ("El tratamiento estándar es la cirugía [1].", False),
        ("Se decide en un comité multidisciplinar.", False),
        ("¿Qué significa esto para el paciente?", False),
    ],
}


@pytest.mark.parametrize(
    ("rule", "sentence", "caught"),
    [(rule, sentence, caught) for rule, cases in CAUGHT_BY_RULE.items() for sentence, caught in cases],
)
def test_a_sentence_a_rule_catches_is_withheld(rule, sentence, caught):
    assert rule(sentence) is caught
    assert unsupported(sentence, support_of([sentence])) is caught


def test_a_sentence_of_the_patient_line_alone_is_withheld_one_adding_to_it_is_not():
    """The default model strung the patient's labels together as explanation (5 of 43 sentences
    read); a sentence that says something of its own about the patient is kept."""
    patient = support_of(["Paciente: estadio aproximado IIB (T3); sin tratamiento activo; "
                          "sin células resistentes; edad 60-69 años; exfumador, 20-39 paquetes-año; "
                          "estado pulmonar crítico."])  # fmt: skip
    assert restates_patient(
        "El paciente está en estado pulmonar crítico, ya que su edad es 60-69 años.", patient
    )
    assert restates_patient("El paciente está aproximado a la edad 60-69 años, con un exfumador.", patient)
    assert not restates_patient("El estadio IIB se trata con cirugía y quimioterapia adyuvante [1].", patient)
    assert not restates_patient("Es un exfumador cuyo tumor no ha recibido tratamiento.", patient)
    assert not restates_patient("[1].", patient)  # says nothing: dropped elsewhere, not withheld here


def test_a_section_keeps_a_sentence_only_when_one_whole_sentence_passes_the_check():
    """Phase.keeps: the engine lets a section go on while this is False."""
    support = support_of(
        ["El estadio I significa un tumor de hasta 4 cm, sin ganglios afectados ni metástasis."]
    )
    good = "El estadio I significa un tumor de hasta 4 cm."
    glued = "El paciente está en estado de cirugía."
    assert not keeps_a_sentence(glued, support)
    assert keeps_a_sentence(f"{glued} {good}", support)
    assert not keeps_a_sentence(f"{glued} El estadio I significa un tumor", support)  # unfinished
    assert not keeps_a_sentence("", support)


def test_a_sentence_rejected_only_for_misplacing_the_patient_is_not_written_again():
    """Phase.retries: a sentence withheld for a claim (another stage, invention) is taken back and
    written again; one withheld only for misplacing the patient is left, and the model goes on."""
    support = support_of(
        ["IVA si están en el tórax.", "El estadio II incluye tumores de más de 4 y hasta 5 cm sin "
         "ganglios (IIA)."]
    )  # fmt: skip
    misplaced = "El paciente está en el tórax, con un tumor de más de 4 y hasta 5 cm sin ganglios (IIA)."
    wrong_stage = "El paciente está en el estadio IV."
    assert not keeps_a_sentence(misplaced, support, stage="IIA (T2b)")
    assert not worth_retrying(misplaced, support, stage="IIA (T2b)")
    assert worth_retrying(wrong_stage, support, stage="IIA (T2b)")
    assert worth_retrying(f"{misplaced} {wrong_stage}", support, stage="IIA (T2b)")
    assert worth_retrying("[1].", support)  # says nothing: written again, as before
