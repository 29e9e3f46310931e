"""Who wrote each section (`origen`), and the grounded summary that stands in for the model.

The summary is built from the retrieved passages' own sentences: a library case's passage is
quoted without its internal id, and the recommendation is the sentence that says what is standard
or recommended, not the first that mentions a treatment. `origen` tells, per section, whether the
model wrote it ("modelo") or the summary did ("fuentes"), on every path an answer can take.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

from conftest import case_request, own_server, read_stream, with_settings

from pulmomed_edge.canonical import canonicalize
from pulmomed_edge.config import CORPUS_DIR
from pulmomed_edge.corpus import load_corpus
from pulmomed_edge.extractive import extractive_sections, sentences
from pulmomed_edge.grounding import SentenceGate, ground_sections, unsupported
from pulmomed_edge.prompts import Sections, citation_numbers, render_prompt, with_citation_numbers
from pulmomed_edge.schema import parse_state
from pulmomed_edge.teacher import Flight

API = "/api/v1/consultar_profesor"
SECTIONS = ("explicacion", "recomendacion")
INVENTED = "El paciente debe tomar azúcar, vitaminas importadas y zumo de naranja cada mañana."


async def post(served, body):
    async with served.session.post(served.url(API), json=body) as resp:
        return resp.status, await resp.json()


async def read_done(served, body) -> dict:
    """The stream's `done` event."""
    (done,) = [data for name, data in await read_stream(served, body) if name == "done"]
    return done


def passages(*ids: str) -> list[tuple[int, str]]:
    """Real corpus passages, numbered as an answer cites them."""
    by_id = {p.id: p for p in load_corpus(CORPUS_DIR)}
    return [(n, p.texto) for n, p in with_citation_numbers([by_id[pid] for pid in ids])]


def sweep() -> list[dict]:
    """Free states across stages, treatments, smoking and lung states."""
    bodies = []
    for volume in (1.0, 20.0, 90.0):
        for treatment in ("ninguno", "quimio", "radio", "inmuno"):
            for smoker, packs in ((True, 40.0), (False, 20.0), (False, 0.0)):
                for resistant in (0.0, volume / 5):
                    body = {"edad": 64, "es_fumador": smoker, "pack_years": packs}
                    body |= {"volumen_tumor_sensible": volume, "volumen_tumor_resistente": resistant}
                    days = 30 if treatment != "ninguno" else 0
                    body |= {"tratamiento_activo": treatment, "dias_tratamiento": days}
                    bodies.append(body)
    late = {"edad": 70, "pack_years": 50, "volumen_tumor_sensible": 80.0}
    bodies += [late | {"lung_state": s} for s in ("critico", "terminal")]
    return bodies


CITATION = re.compile(r"\[(\d+)\]")


def origin_is_consistent(body: dict) -> None:
    """`origen` against the label: a fallback that kept nothing of the model is the summary's in
    both sections; an answer labelled with the model's name has at least one of its sections.
    (A timed-out or broken-off answer may keep the model's sentences a student was shown.)"""
    origin = body["origen"]
    assert origin.keys() == set(SECTIONS) and set(origin.values()) <= {"modelo", "fuentes"}
    label = body["llm_model"]
    if label.startswith("fallback-") and label not in ("fallback-timeout", "fallback-error"):
        assert origin == {"explicacion": "fuentes", "recomendacion": "fuentes"}, body
    if not label.startswith("fallback-"):
        assert "modelo" in origin.values(), body


# --- the grounded summary -------------------------------------------------------------------


async def test_a_library_case_summary_never_shows_the_case_id(settings):
    """No LLM (fallback-unavailable): every library case gets the summary, which names the case
    once, by its stage, and quotes the case's passage without «Caso de biblioteca SEER_…(…):»."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        for case in served.state.library.all():
            status, body = await post(served, case_request(case))
            assert status == 200 and body["llm_model"] == "fallback-unavailable", body
            text = body["explicacion"] + " " + body["recomendacion"]
            assert "SEER_" not in text and "Caso de biblioteca SEER" not in text, text
            assert body["explicacion"].startswith(f"Caso de biblioteca en estadio {case.estadio};")
            assert body["explicacion"].count("Caso de biblioteca") == 1
            # what followed the id opens the sentence after the lead-in: capitalised
            assert sentences(body["explicacion"])[1][0].isupper(), body["explicacion"]
            assert body["origen"] == {"explicacion": "fuentes", "recomendacion": "fuentes"}


def test_the_stage_i_recommendation_is_the_standard_treatment_not_a_mention_of_one():
    """Stage I passage first: «…potencialmente curable con un tratamiento local» mentions a
    treatment, the next sentence says what the guidelines hold standard (lobectomy, else SBRT)."""
    state = canonicalize(
        parse_state({"age": 60, "is_smoker": True, "pack_years": 30, "sensitive_tumor_volume": 1.0}, set())
    )
    found = passages("tnm-estadio-i-01", "tab-dejar-fumar-01")
    standard = next(s for s in sentences(found[0][1]) if "estándar" in s)
    summary = extractive_sections(state, found)
    # a current smoker: the passage's sentence on quitting follows, with its own citation
    quitting = sentences(found[1][1])[0]
    assert summary.recomendacion == f"{standard} [1] {quitting} [2]"
    assert "lobectomía" in summary.recomendacion and "potencialmente curable" not in summary.recomendacion


def test_a_library_case_recommendation_is_its_standard_treatment():
    """SEER_001's passage says a screening was not "indicado" before it says "El tratamiento
    estándar es la cirugía": the standard wins, and the case's passage (first) over the others."""
    state = canonicalize(
        parse_state(
            {
                "age": 58,
                "pack_years": 15,
                "sensitive_tumor_volume": 2.5,
                "modo": "biblioteca",
                "caso_id": "SEER_001_estadio_IA",
            },
            {"SEER_001_estadio_IA"},
        )
    )
    found = passages("caso-seer-001-01", "tnm-estadio-i-01", "crib-nlst-01")
    summary = extractive_sections(state, found, "IA")
    assert summary.recomendacion == "El tratamiento estándar es la cirugía con intención curativa. [1]"
    assert summary.explicacion.startswith("Caso de biblioteca en estadio IA; paciente exfumador")
    assert "Paciente de 58 años" in summary.explicacion and "SEER_" not in summary.explicacion


def test_a_library_case_recommendation_keeps_its_caveat_and_names_the_plan():
    """SEER_004 is ECOG 2: pembrolizumab came without «Ese ensayo solo incluyó pacientes con ECOG
    0–1…»; SEER_006 without whether he tolerates chemoradiotherapy; SEER_003 got «Si llegara a
    enfermedad avanzada…», the plan for a stage it is not in, instead of osimertinib's plan."""
    state = canonicalize(parse_state({"age": 71, "pack_years": 38, "sensitive_tumor_volume": 45.6}, set()))
    seer_004 = extractive_sections(state, passages("caso-seer-004-01"), "IVB").recomendacion
    assert "pembrolizumab" in seer_004 and "ECOG 2 la decisión se individualiza" in seer_004
    seer_006 = extractive_sections(state, passages("caso-seer-006-01"), "IIIB").recomendacion
    assert "durvalumab" in seer_006 and "lo tolera" in seer_006 and "EMA" not in seer_006
    seer_003 = extractive_sections(state, passages("caso-seer-003-01"), "IIIA").recomendacion
    assert seer_003.startswith("La mutación cambia el plan") and "osimertinib" in seer_003
    # a sentence after it that is not a caveat stays out
    seer_001 = extractive_sections(state, passages("caso-seer-001-02"), "IA").recomendacion
    assert seer_001.endswith("con evaluación sistemática de los ganglios linfáticos. [1]"), seer_001


def test_a_sentence_saying_what_is_not_done_is_never_the_recommendation():
    """«La radiografía de tórax no se recomienda para el cribado…» has the strongest hint and came
    first: it was served as what to do (the recommendation is the summary's with the pinned
    models, so every student would read it)."""
    state = canonicalize(parse_state({"age": 60, "pack_years": 30, "sensitive_tumor_volume": 1.0}, set()))
    found = passages("crib-radiografia-01", "tnm-estadio-i-01")
    summary = extractive_sections(state, found)
    assert "no se recomienda" not in summary.recomendacion.lower()
    assert "estándar" in summary.recomendacion and summary.recomendacion.endswith("[2]")
    # "no microcítico" is a name, not a negation
    named = [(1, "En el cáncer de pulmón no microcítico el tratamiento estándar es la cirugía.")]
    assert extractive_sections(state, named).recomendacion.startswith("En el cáncer de pulmón no micro")


def test_passages_of_one_source_share_its_number():
    assert citation_numbers(["NCCN", "ESMO", "NCCN", "IASLC", "ESMO"]) == [1, 2, 1, 3, 2]


async def test_every_citation_in_a_summary_is_an_entry_of_fuentes(settings):
    """`fuentes` lists each source once, so passages are cited by their source's place in it:
    numbered by place, three passages from two sources gave a «[3]» with no third source. (With
    the default three passages no state of the sweep draws two of one source any more, so it
    runs with four, as a lab may set.)"""
    shared = 0
    async with own_server(with_settings(settings, model="no-such-model", top_k_passages=4)) as served:
        bodies = sweep() + [case_request(case) for case in served.state.library.all()]
        for body in bodies:
            status, answer = await post(served, body)
            assert status == 200 and answer["llm_model"] == "fallback-unavailable", answer
            shared += answer["retrieved_chunks"] > len(answer["fuentes"])
            cited = {int(n) for n in CITATION.findall(answer["explicacion"] + answer["recomendacion"])}
            assert cited and cited <= set(range(1, len(answer["fuentes"]) + 1)), (body, answer)
    assert shared, "no state retrieved two passages of one source: the sweep no longer tests the numbering"


async def test_every_passage_label_in_a_prompt_is_an_entry_of_fuentes(served):
    """What the model is shown: «[n] …» labels only the sources the answer lists, in its order."""
    teacher = served.state.teacher
    for body in sweep():
        prepared = teacher.prepare(parse_state(body, teacher.library.ids))
        text = render_prompt(teacher.llm.template, prepared.state, prepared.case, prepared.passages)
        labels = [int(n) for n in re.findall(r"^\[(\d+)\] ", text, flags=re.M)]
        assert len(labels) == len(prepared.passages)
        sources = list(dict.fromkeys(p.fuente for p in prepared.passages))
        assert [sources[n - 1] for n in labels] == [p.fuente for p in prepared.passages]


async def test_a_critical_or_terminal_patient_is_recommended_palliative_care_never_surgery(settings):
    """A terminal patient on immunotherapy was recommended the stage's standard («…pueden operarse…
    el estándar es la quimiorradioterapia…»): the stage passage leads and has the strongest hint.
    For a critical or terminal patient the recommendation is now ASCO's on palliative care."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        for volume in (1.0, 20.0, 90.0):
            for treatment in ("ninguno", "inmuno"):
                for lung_state in ("critico", "terminal"):
                    body = {"edad": 82, "pack_years": 40, "volumen_tumor_sensible": volume}
                    body |= {"tratamiento_activo": treatment, "lung_state": lung_state}
                    status, answer = await post(served, body)
                    assert status == 200, answer
                    recommendation = answer["recomendacion"]
                    assert "paliativos" in recommendation and "recomienda" in recommendation, (body, answer)
                    assert not re.search(r"cirug|operar|lobectom|resecc", recommendation, re.I), (
                        recommendation
                    )
                    # the stage passage still explains the stage; the citation names its source
                    assert "palia-que-es-01" in answer["pasajes"]
                    cited = int(CITATION.findall(recommendation)[-1])
                    assert answer["fuentes"][cited - 1].startswith("ASCO 2017")
        # the same state, stable: the stage's standard as before
        status, answer = await post(served, {"edad": 82, "pack_years": 40, "volumen_tumor_sensible": 1.0})
        assert "lobectomía" in answer["recomendacion"]


async def test_a_tumour_growing_under_treatment_is_recommended_the_next_step_never_surgery(settings):
    """A stage II patient progressing on chemotherapy was recommended «la cirugía» (the stage's
    first treatment). Progressing under treatment, the recommendation is now to re-evaluate for
    another treatment (stage I-II) or the second line (stage III-IV: immunotherapy, or
    chemotherapy for a patient progressing on it), cited to its guideline."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        for volume, expected in ((20.0, "reevaluar"), (90.0, "segunda línea")):
            for treatment in ("quimio", "radio", "inmuno"):
                body = {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": volume}
                body |= {"volumen_tumor_resistente": volume / 4, "lung_state": "progresando"}
                body |= {"tratamiento_activo": treatment, "dias_tratamiento": 120}
                status, answer = await post(served, body)
                assert status == 200, answer
                recommendation = answer["recomendacion"]
                assert expected in recommendation, (body, recommendation)
                if volume == 90.0:  # on immunotherapy: chemotherapy (a platinum doublet, or docetaxel
                    # after chemotherapy with it); on anything else: immunotherapy
                    on_immunotherapy = treatment == "inmuno"
                    assert ("doblete" in recommendation) == on_immunotherapy, recommendation
                    assert ("PD-1" in recommendation) != on_immunotherapy, recommendation
                assert not re.search(r"cirug|operar|lobectom|resecc", recommendation, re.I), recommendation
                cited = int(CITATION.findall(recommendation)[-1])
                assert answer["fuentes"][cited - 1].startswith("ESMO Clinical Practice Guideline")
        # advanced disease: the caveat for a patient too frail for a second line comes with it
        assert "paliativos" in recommendation
        # the same state, stable on treatment: neither (go on and assess the response, below)
        body = {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": 20.0, "tratamiento_activo": "quimio"}
        status, answer = await post(served, body | {"lung_state": "estable"})
        assert "segunda línea" not in answer["recomendacion"] and "reevaluar" not in answer["recomendacion"]


async def test_a_patient_on_treatment_whose_tumour_does_not_grow_is_recommended_the_next_step_at_their_stage(
    settings,
):
    """The medical review: a stage IIA patient 100 days into chemotherapy, or on radiotherapy, was
    told «cirugía seguida de quimioterapia adyuvante», the stage's first treatment, not this
    patient's next step. On treatment and not progressing, the recommendation is now, cited to
    its source: in stage I-II to complete the curative plan (NCCN), or after radiotherapy CT
    follow-up; in stage III the stage's standard (it names the consolidation that follows
    chemoradiotherapy); in stage IV to keep the treatment and assess its response (ESMO), and on
    radiotherapy there what it is for: symptoms, while the systemic treatment controls the
    disease (NCCN)."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        seer_004 = case_request(served.state.library.get("SEER_004_estadio_IV_metastasis"))
        for treatment in ("quimio", "radio", "inmuno"):
            for lung_state in ("estable", None):
                on_treatment = {"tratamiento_activo": treatment, "dias_tratamiento": 100}
                if lung_state:
                    on_treatment["lung_state"] = lung_state
                for base in (
                    {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": 20.0},
                    {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": 90.0},
                    seer_004,
                ):
                    body = base | on_treatment
                    status, answer = await post(served, body)
                    assert status == 200, answer
                    recommendation = answer["recomendacion"]
                    cited = answer["fuentes"][int(CITATION.findall(recommendation)[-1]) - 1]
                    stage = answer["estadio"]
                    if stage.startswith("III"):
                        assert "durvalumab" in recommendation, (body, recommendation)
                    elif stage.startswith("IV") and treatment == "radio":
                        # a local treatment there: for symptoms, while the systemic one controls
                        # the disease (not «tras dos o tres ciclos» of radiotherapy)
                        assert "aliviar síntomas" in recommendation, (body, answer)
                        assert "ciclos" not in recommendation, recommendation
                        assert cited.startswith("NCCN"), cited
                    elif stage.startswith("IV"):
                        assert "mantenerlo y evaluar la respuesta" in recommendation, (body, answer)
                        assert cited.startswith("ESMO Clinical Practice Guidelines"), cited
                    elif treatment == "radio":
                        assert "TC de tórax cada 3 a 6 meses" in recommendation, (body, recommendation)
                        assert cited.startswith("NCCN"), cited
                    else:
                        assert "completar el plan previsto" in recommendation, (body, recommendation)
                        assert cited.startswith("NCCN"), cited
                    assert not re.search(r"segunda l|reevalu", recommendation, re.I), recommendation
        # untreated, the stage's standard as before
        status, answer = await post(served, {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": 20.0})
        assert "cirugía" in answer["recomendacion"], answer


async def test_a_stage_ia_patient_on_chemotherapy_or_immunotherapy_is_recommended_the_local_treatment(
    settings,
):
    """A blind review: «en los estadios I-II la quimioterapia… forma parte de un tratamiento con
    intención curativa» is too broad for stage IA, where adjuvant chemotherapy brought no benefit
    (LACE) and the treatment is local. A stage IA patient on either is now recommended the stage's
    standard, surgery or SBRT (NCCN), with the passage that says why; never to complete the plan."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        for treatment in ("quimio", "inmuno"):
            body = {"edad": 66, "pack_years": 30, "volumen_tumor_sensible": 2.0, "dias_tratamiento": 30}
            status, answer = await post(served, body | {"tratamiento_activo": treatment})
            assert status == 200 and answer["estadio"].startswith("IA"), answer
            recommendation = answer["recomendacion"]
            assert "resección anatómica (lobectomía)" in recommendation, recommendation
            assert "SBRT" in recommendation and "completar el plan" not in recommendation
            cited = answer["fuentes"][int(CITATION.findall(recommendation)[-1]) - 1]
            assert "NCCN" in cited, cited
            # why not the chemotherapy: LACE found no benefit in IA
            assert "adyu-quimio-02" in answer["pasajes"], answer["pasajes"]
        # after radiotherapy (SBRT is its local treatment) CT follow-up, as before
        status, answer = await post(served, body | {"tratamiento_activo": "radio"})
        assert "TC de tórax cada 3 a 6 meses" in answer["recomendacion"], answer


async def test_a_current_smoker_is_told_that_quitting_still_matters_an_ex_smoker_is_not(settings):
    """Read after the content fixes: no current smoker's answer mentioned quitting, not even
    SEER_002's, whose teaching goal it is. The summary's recommendation now adds the retrieved
    passages' sentence on quitting, cited, for a current smoker only."""
    async with own_server(with_settings(settings, model="no-such-model")) as served:
        smoker = {"edad": 67, "es_fumador": True, "pack_years": 45, "volumen_tumor_sensible": 20.0}
        seer_002 = case_request(served.state.library.get("SEER_002_fumador_activo"))
        for body in (smoker, seer_002):
            status, answer = await post(served, body)
            recommendation = answer["recomendacion"]
            assert status == 200 and "Dejar de fumar" in recommendation, answer
            cited = [int(n) for n in CITATION.findall(recommendation)]
            assert len(cited) == 2 and max(cited) <= len(answer["fuentes"]), answer
        quit_years_ago = {**smoker, "es_fumador": False, "dias_desde_cambio": 4000}
        status, answer = await post(served, quit_years_ago)
        assert status == 200 and "Dejar de fumar" not in answer["recomendacion"], answer


# --- origen on every path ---------------------------------------------------------------------


async def test_generated_answers_say_who_wrote_each_section_in_json_stream_and_cache(served):
    """With the test model most answers end up `fallback-unsupported`; whatever the label, `origen`
    agrees with it, a "fuentes" section is the summary's text, and the stream's `done` and a later
    cache hit carry the same `origen`."""
    teacher = served.state.teacher
    states = [
        {"age": 47, "pack_years": 22, "sensitive_tumor_volume": 1.4, "diet": "saludable"},
        {
            "age": 69,
            "is_smoker": True,
            "pack_years": 55,
            "sensitive_tumor_volume": 33.0,
            "treatment": "quimio",
        },
    ]
    for body in states:
        done = await read_done(served, body)
        status, again = await post(served, body)
        assert status == 200 and again["cache"] == "hit"
        for answer in (done, again):
            origin_is_consistent(answer)
        assert again["origen"] == done["origen"]
        prepared = teacher.prepared_if_known(parse_state(body, teacher.library.ids))
        summary = teacher._extractive(prepared)
        for name in SECTIONS:
            if done["origen"][name] == "fuentes":
                assert done[name] == getattr(summary, name)


async def test_a_sentence_made_only_of_the_patient_line_is_withheld(served):
    """«El paciente está en estado pulmonar crítico, ya que su edad es 60-69 años»: every word was
    in the prompt (the patient line), so the term check passed it; it takes nothing from a source.
    A sentence that restates a passage about the patient stays."""
    teacher = served.state.teacher
    body = {"age": 64, "pack_years": 40, "sensitive_tumor_volume": 30.0, "lung_state": "critico"}
    prepared = await asyncio.to_thread(teacher.prepare, parse_state(body, set()))
    labels = "El paciente está en estado pulmonar crítico, ya que su edad es 60-69 años."
    assert "60-69" in user_prompt(teacher, prepared) and not unsupported(labels, prepared.support)
    restated = sentences(prepared.passages[0].texto)[0].rstrip(".") + " [1]."
    checked = teacher._checked(prepared, Sections(f"{labels} {restated}", restated), "modelo-de-prueba")
    assert checked.explicacion == restated and checked.frases_retiradas == 1
    gate = SentenceGate(prepared.support, prepared.stage, patient=prepared.patient)
    assert gate.feed("explicacion", labels + " ") == []


def user_prompt(teacher, prepared) -> str:
    return render_prompt(teacher.llm.template, prepared.state, prepared.case, prepared.passages)


async def test_a_model_answer_with_one_section_withheld_is_mixed(served):
    """Real ground_sections output on a real prepared state: the explanation restates passage 1
    (kept), the recommendation is invented (withheld). The answer keeps the model's name, and
    `origen` says the recommendation is the summary's; the other way round, too."""
    from pulmomed_edge.teacher import _completed

    teacher = served.state.teacher
    state = parse_state(
        {"age": 58, "pack_years": 40, "sensitive_tumor_volume": 30.0, "treatment": "radio"}, set()
    )
    prepared = await asyncio.to_thread(teacher.prepare, state)
    summary = teacher._extractive(prepared)
    restated = sentences(prepared.passages[0].texto)[0].rstrip(".") + " [1]."
    answer = Sections(explicacion=restated, recomendacion=INVENTED)

    grounded = ground_sections(answer, prepared.support, summary, stage=prepared.stage)
    assert grounded.kept == 1 and grounded.withheld == [INVENTED]
    assert grounded.sections == Sections(restated, summary.recomendacion)
    assert grounded.filled == ("recomendacion",)
    # what students were shown, completed the same way (_keeping_shown)
    final, origin = _completed(Sections(restated, ""), summary)
    assert final == Sections(restated, summary.recomendacion)
    assert (origin.explicacion, origin.recomendacion) == ("modelo", "fuentes")

    checked = teacher._checked(prepared, answer, "modelo-de-prueba")
    assert checked.llm_model == "modelo-de-prueba" and checked.frases_retiradas == 1
    assert checked.recomendacion == summary.recomendacion
    assert checked.model_dump()["origen"] == {"explicacion": "modelo", "recomendacion": "fuentes"}

    swapped = teacher._checked(prepared, Sections(INVENTED, restated), "modelo-de-prueba")
    assert swapped.explicacion == summary.explicacion and swapped.recomendacion == restated
    assert swapped.model_dump()["origen"] == {"explicacion": "fuentes", "recomendacion": "modelo"}

    nothing = teacher._checked(prepared, Sections(INVENTED, INVENTED), "modelo-de-prueba")
    assert nothing.llm_model == "fallback-unsupported"
    assert nothing.model_dump()["origen"] == {"explicacion": "fuentes", "recomendacion": "fuentes"}


async def test_an_answer_that_ended_before_its_recommendation_keeps_its_explanation(served):
    """Once in a full test run, a tight max_new_tokens and a sentence taken back left the test
    model's answer without its recommendation, and the student got `fallback-error`. The
    explanation now stays, the summary's recommendation completes it, and `origen` says so; only
    an answer with no explanation at all is an error."""
    teacher = served.state.teacher
    state = parse_state({"age": 58, "pack_years": 40, "sensitive_tumor_volume": 30.0}, set())
    prepared = await asyncio.to_thread(teacher.prepare, state)
    restated = sentences(prepared.passages[0].texto)[0].rstrip(".") + " [1]."
    for written in (f" {restated} Y lo que", f" {restated}\nRecomen", f" {restated}\nRecomendación: "):
        sections = teacher._sections(written)
        assert sections == Sections(restated, ""), written
        checked = teacher._checked(prepared, sections, "modelo-de-prueba")
        assert checked.llm_model == "modelo-de-prueba" and checked.explicacion == restated
        assert checked.recomendacion == teacher._extractive(prepared).recomendacion
        assert checked.model_dump()["origen"] == {"explicacion": "modelo", "recomendacion": "fuentes"}
    assert teacher._sections(" ") is None and teacher._sections("\nRecomendación: Operar.") is None


async def test_a_fallback_is_the_summary_and_a_timeout_keeps_what_was_shown(served, seed):
    """A fallback: both "fuentes". A timeout that keeps the explanation a student was shown: that
    section is the model's, the other the summary's, though the label is a fallback's."""
    teacher = served.state.teacher
    state = parse_state({**seed, "age": 33, "lung_state": "estable"}, teacher.library.ids)
    prepared = await asyncio.to_thread(teacher.prepare, state)
    busy = teacher._fallback(prepared, "fallback-busy")
    assert busy.model_dump()["origen"] == {"explicacion": "fuentes", "recomendacion": "fuentes"}

    flight = Flight(prepared)
    assert (
        teacher._keeping_shown(flight, "fallback-timeout").model_dump()["origen"]
        == busy.model_dump()["origen"]
    )
    flight.publish("delta", ("explicacion", "Una frase que el estudiante ya leyó."))
    kept = teacher._keeping_shown(flight, "fallback-timeout")
    assert (
        kept.explicacion == "Una frase que el estudiante ya leyó."
        and kept.recomendacion == busy.recomendacion
    )
    assert kept.model_dump()["origen"] == {"explicacion": "modelo", "recomendacion": "fuentes"}


async def test_with_the_grounding_check_off_the_answer_is_the_models(served, seed, monkeypatch):
    """PULMOMED_GROUNDING=0: the model's answer as written, both sections "modelo"."""
    teacher = served.state.teacher
    state = parse_state({**seed, "age": 34, "lung_state": "estable"}, teacher.library.ids)
    prepared = await asyncio.to_thread(teacher.prepare, state)
    monkeypatch.setattr(teacher, "config", dataclasses.replace(teacher.config, grounding=False))
    unchecked = teacher._checked(prepared, Sections(INVENTED, INVENTED), "modelo-de-prueba")
    assert unchecked.explicacion == INVENTED and unchecked.llm_model == "modelo-de-prueba"
    assert unchecked.model_dump()["origen"] == {"explicacion": "modelo", "recomendacion": "modelo"}
