"""POST /api/v1/consultar_profesor and friends, exactly as shared/API.md says, over real HTTP."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import case_request, generated

from pulmomed_edge.engine.scheduler import common_prefix
from pulmomed_edge.prompts import Sections, render_prompt
from pulmomed_edge.schema import ADVERTENCIA, parse_state
from pulmomed_edge.teacher import cacheable

API = "/api/v1/consultar_profesor"
RESPONSE_KEYS = {
    "explicacion",
    "recomendacion",
    "fuentes",
    "advertencia",
    "retrieved_chunks",
    "llm_model",
    "model_used",
    "processing_time_ms",
}


async def post(served, body, *, raw: bytes | None = None, path: str = API):
    data = raw if raw is not None else json.dumps(body).encode()
    async with served.session.post(
        served.url(path), data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json()


async def test_seed_request_succeeds_with_a_generated_grounded_answer(served, seed):
    status, body = await post(served, seed)
    assert status == 200, body
    assert body.keys() >= RESPONSE_KEYS
    assert body["llm_model"] == body["model_used"]
    assert generated(body["llm_model"], "smollm2-135m-instruct-q4_1")
    assert body["explicacion"].strip() and body["recomendacion"].strip()
    assert body["advertencia"] == ADVERTENCIA
    assert body["retrieved_chunks"] == len(body["pasajes"]) >= 1
    assert 1 <= len(body["fuentes"]) <= body["retrieved_chunks"]
    assert body["estadio"] == "IB (T2a)"
    assert isinstance(body["processing_time_ms"], int) and body["processing_time_ms"] >= 0


async def test_fuentes_are_exactly_the_sources_of_the_passages_used(served, seed):
    seed["age"] = 66
    _, body = await post(served, seed)
    index = served.state.retriever.index
    by_id = {p.id: p for p in index.passages}
    expected = list(dict.fromkeys(by_id[i].fuente for i in body["pasajes"]))
    assert body["fuentes"] == expected


async def test_ex_smoker_is_valid(served):
    status, body = await post(
        served, {"edad": 61, "es_fumador": False, "pack_years": 25, "volumen_tumor_sensible": 2.0}
    )
    assert status == 200, body
    assert body["estadio"] == "IA (T1a)"


async def test_spanish_wire_names_work_too(served):
    body = {
        "edad": 70,
        "es_fumador": True,
        "pack_years": 50,
        "dias_desde_cambio": 0,
        "dieta": "mala",
        "volumen_tumor_sensible": 30.0,
        "volumen_tumor_resistente": 5.0,
        "tratamiento_activo": "quimio",
        "dias_tratamiento": 40,
        "modo": "libre",
        "caso_id": None,
        "lung_state": "progresando",
    }
    status, answer = await post(served, body)
    assert status == 200, answer
    assert answer["estadio"] == "IIB (T3)"


async def test_a_library_case_answer_names_the_case_own_stage(served):
    """SEER_005's volumes alone read "IIA (T2b)"; its answer said so beside a text about stage IVA.
    `estadio` is now the stage the teacher taught by: the case's own."""
    case = served.state.library.get("SEER_005_joven_nunca_fumador")
    body = case_request(case)
    status, answer = await post(served, body)
    assert status == 200, answer
    assert answer["estadio"] == case.estadio == "IVA"
    status, free = await post(served, {**body, "modo": "libre", "caso_id": None})
    assert free["estadio"].startswith("II")  # the same volumes as a free state: from the volume


@pytest.mark.parametrize(
    ("body", "campo"),
    [
        ({"age": 17, "sensitive_tumor_volume": 1.0}, "age"),
        ({"edad": 101, "volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": 50, "volumen_tumor_sensible": -1.0}, "volumen_tumor_sensible"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "pack_years": 151}, "pack_years"),
        ({"edad": "cincuenta", "volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": "50", "volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": 50.5, "volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "es_fumador": "si"}, "es_fumador"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "dieta": "vegana"}, "dieta"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "tratamiento_activo": "cirugia"}, "tratamiento_activo"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "modo": "examen"}, "modo"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "lung_state": "roto"}, "lung_state"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "dias_tratamiento": -3}, "dias_tratamiento"),
        ({"edad": 50}, "volumen_tumor_sensible"),
        ({"volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": 50, "age": 50, "volumen_tumor_sensible": 1.0}, "edad"),
        ({"edad": 50, "volumen_tumor_sensible": 1.0, "modo": "biblioteca"}, "caso_id"),
        (
            {"edad": 50, "volumen_tumor_sensible": 1.0, "mode": "biblioteca", "case_id": "NO_EXISTE"},
            "case_id",
        ),
    ],
)
async def test_bad_field_is_422_naming_the_field_in_spanish(served, body, campo):
    status, answer = await post(served, body)
    assert status == 422, answer
    assert answer["error"]
    assert campo in [d["campo"] for d in answer["detalles"]], answer
    assert all(d["mensaje"] for d in answer["detalles"])


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_422(served, constant):
    raw = f'{{"edad": 50, "volumen_tumor_sensible": {constant}}}'.encode()
    status, answer = await post(served, None, raw=raw)
    assert status == 422
    assert answer["detalles"][0]["campo"] == "volumen_tumor_sensible"
    assert "finito" in answer["detalles"][0]["mensaje"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"texto"', b"42"])
async def test_body_that_is_not_a_json_object_is_400(served, raw):
    status, answer = await post(served, None, raw=raw)
    assert status == 400
    assert answer["error"]


async def test_body_over_64_kib_is_413(served, seed):
    raw = json.dumps({**seed, "relleno": "x" * (65 * 1024)}).encode()
    status, answer = await post(served, None, raw=raw)
    assert status == 413
    assert "64 KiB" in answer["error"]


async def test_caso_id_is_any_string_in_libre_mode(served, seed):
    """API.md: "string or null", a library id only in biblioteca mode (it was capped at 100)."""
    status, body = await post(served, {**seed, "caso_id": "x" * 300})
    assert status == 200, body


async def test_state_survives_a_bad_request(served, seed):
    await post(served, None, raw=b"{broken")
    status, _ = await post(served, seed)
    assert status == 200


async def test_biblioteca_with_a_real_case_puts_the_case_in_the_answer(served):
    body = {
        "edad": 52,
        "es_fumador": False,
        "pack_years": 0,
        "volumen_tumor_sensible": 24.8,
        "volumen_tumor_resistente": 0.5,
        "modo": "biblioteca",
        "caso_id": "SEER_003_mutacion_EGFR",
    }
    status, answer = await post(served, body)
    assert status == 200, answer
    case = served.state.library.get("SEER_003_mutacion_EGFR")
    assert case.fuente_estadistica in answer["fuentes"]


async def test_a_library_case_is_taught_at_its_own_stage_not_its_volumes(served):
    """SEER_004 is stage IV with a primary whose volume reads "IIB": the stage passage retrieved is
    stage IV's, the extractive summary names the case's stage, and a sentence putting the patient
    in stage II is withheld."""
    teacher = served.state.teacher
    body = {
        "edad": 71,
        "pack_years": 38,
        "volumen_tumor_sensible": 45.6,
        "volumen_tumor_resistente": 8.2,
        "modo": "biblioteca",
        "caso_id": "SEER_004_estadio_IV_metastasis",
    }
    prepared = await asyncio.to_thread(teacher.prepare, parse_state(body, teacher.library.ids))
    assert prepared.state.stage.startswith("IIB") and prepared.stage == "IV"
    ids = [p.id for p in prepared.passages]
    assert not any(i.startswith("tnm-estadio-ii") for i in ids), ids
    summary = teacher._fallback(prepared, "fallback-busy")
    assert summary.explicacion.startswith("Caso de biblioteca en estadio IV;")
    assert "aproximadamente al estadio IIB" not in summary.explicacion
    answer = Sections(
        explicacion="El paciente se encuentra en el estadio II del cáncer de pulmón no microcítico.",
        recomendacion=summary.recomendacion,
    )
    checked = teacher._checked(prepared, answer, "modelo-de-prueba")
    assert checked.explicacion == summary.explicacion and checked.frases_retiradas == 1


async def test_cache_hit_does_not_call_the_llm_and_a_new_age_decade_misses(served):
    engine = served.state.engine
    body = {"age": 44, "pack_years": 12, "is_smoker": True, "sensitive_tumor_volume": 20.0}
    _, first = await post(served, body)
    generations = engine.counters["generations"]
    _, again = await post(served, {**body, "age": 47})  # same decade, same buckets
    assert engine.counters["generations"] == generations
    assert again["cache"] == "hit"
    assert again["explicacion"] == first["explicacion"]
    _, other = await post(served, {**body, "age": 52})  # another decade
    assert engine.counters["generations"] == generations + 1
    assert other["cache"] == "miss"


async def test_fallback_timeout_answers_from_passages_and_frees_the_slot(served):
    from dataclasses import replace

    teacher = served.state.teacher
    original = teacher.config
    teacher.config = replace(original, budget_s=0.05, admit_share=float("inf"))  # admit, then time out
    waited = teacher.timeouts["waiting"]
    try:
        status, body = await post(served, {"age": 81, "pack_years": 70, "sensitive_tumor_volume": 90.0})
    finally:
        teacher.config = original
    assert status == 200
    assert body["llm_model"] == body["model_used"] == "fallback-timeout"
    assert body["explicacion"] and body["recomendacion"] and body["fuentes"]
    # counted by when it ran out: before the model wrote a word
    async with served.session.get(served.url("/api/v1/health")) as resp:
        assert (await resp.json())["activity"]["timeouts"]["waiting"] == waited + 1
    for _ in range(250):  # the worker frees the slot at its next decode step
        if served.state.engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.02)
    assert served.state.engine.stats()["active"] == 0
    # fallbacks are not cached: the same state now gets a real answer
    status, again = await post(served, {"age": 81, "pack_years": 70, "sensitive_tumor_volume": 90.0})
    assert generated(again["llm_model"], "smollm2-135m-instruct-q4_1")


async def test_health_answers_fast_while_a_generation_runs(served):
    body = {"age": 38, "pack_years": 0, "sensitive_tumor_volume": 60.0, "active_treatment": "inmuno"}
    generation = asyncio.create_task(post(served, body))
    for _ in range(200):
        if served.state.engine.stats()["active"] > 0:
            break
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with served.session.get(served.url("/api/v1/health")) as resp:
        health = await resp.json()
    elapsed = loop.time() - started
    assert resp.status == 200 and health["status"] == "healthy"
    assert elapsed < 0.2
    status, _ = await generation
    assert status == 200


async def test_library_cases_and_alias(served):
    for path in ("/api/v1/library_cases", "/api/v1/casos_biblioteca"):
        async with served.session.get(served.url(path)) as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["count"] == 7 == len(body["cases"])
        required = {
            "caso_id",
            "titulo",
            "estadio",
            "descripcion",
            "edad",
            "es_fumador",
            "pack_years",
            "dieta",
            "volumen_inicial_sensible",
            "volumen_inicial_resistente",
            "objetivos_aprendizaje",
            "fuente_estadistica",
        }
        assert all(required <= c.keys() for c in body["cases"])


async def test_one_library_case_and_unknown_is_404(served):
    async with served.session.get(served.url("/api/v1/library_cases/SEER_006_comorbilidades")) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["found"] is True
    assert body["case"]["edad"] == 74 and body["case"]["pack_years"] == 60
    async with served.session.get(served.url("/api/v1/library_cases/NADA")) as resp:
        body = await resp.json()
    assert resp.status == 404 and body["error"]


async def test_health_reports_every_component(served):
    async with served.session.get(served.url("/api/v1/health")) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "healthy"
    comps = body["components"]
    assert comps["llm"]["loaded"] is True and len(comps["llm"]["sha256"]) == 64
    assert comps["index"]["passages"] >= 120 and comps["index"]["index_id"]
    assert comps["embeddings"]["status"] == "ready"
    assert {"entries", "hits", "misses"} <= comps["cache"].keys()
    assert body["version"]


async def test_unknown_route_is_json_404(served):
    async with served.session.get(served.url("/api/v1/nada")) as resp:
        body = await resp.json()
    assert resp.status == 404 and body["error"]


async def test_grounding_check_trims_the_answer_and_counts_it_unless_turned_off(served):
    """The teacher's own check on a real prepared state: an invented recommendation is replaced by
    the grounded one and counted in health; with PULMOMED_GROUNDING=0 the answer is left alone."""
    import dataclasses

    teacher = served.state.teacher
    state = parse_state(
        {"age": 58, "pack_years": 40, "sensitive_tumor_volume": 30.0, "treatment": "radio"}, set()
    )
    prepared = await asyncio.to_thread(teacher.prepare, state)
    first = prepared.passages[0].texto.split(". ")[0].rstrip(".") + " [1]."
    invented = "El paciente debe tomar azúcar, vitaminas importadas y zumo de naranja cada mañana."
    answer = Sections(explicacion=first, recomendacion=invented)
    before = dict(teacher.grounding)
    checked = teacher._checked(prepared, answer, "modelo-de-prueba")
    assert checked.explicacion == first and checked.recomendacion != invented
    assert checked.recomendacion == teacher._fallback(prepared, "x").recomendacion
    assert checked.frases_retiradas == 1 and checked.llm_model == "modelo-de-prueba"
    assert teacher.grounding["trimmed"] == before["trimmed"] + 1
    async with served.session.get(served.url("/api/v1/health")) as resp:
        assert (await resp.json())["activity"]["grounding"] == {"enabled": True, **teacher.grounding}
    original = teacher.config
    teacher.config = dataclasses.replace(original, grounding=False)
    try:
        unchecked = teacher._checked(prepared, answer, "modelo-de-prueba")
    finally:
        teacher.config = original
    assert unchecked.recomendacion == invented and unchecked.frases_retiradas == 0


async def test_an_answer_whose_sources_support_none_of_it_is_labelled_a_fallback(served):
    """The teacher's check on a real prepared state: when every sentence is withheld the student
    reads the extractive summary, and the answer is labelled `fallback-unsupported`, not with the
    model's name (API: "fallback-…" when the model did not write it). Such an answer is cached,
    unlike the fallbacks a later try may beat."""
    teacher = served.state.teacher
    state = parse_state(
        {"age": 81, "pack_years": 12, "sensitive_tumor_volume": 55.0, "treatment": "quimio"}, set()
    )
    prepared = await asyncio.to_thread(teacher.prepare, state)
    invented = Sections(
        explicacion="El paciente debe tomar azúcar y vitaminas importadas cada mañana.",
        recomendacion="Se cura con zumo de naranja, miel de abeja y paseos por la montaña.",
    )
    checked = teacher._checked(prepared, invented, "modelo-de-prueba")
    summary = teacher._fallback(prepared, "x")
    assert (checked.explicacion, checked.recomendacion) == (summary.explicacion, summary.recomendacion)
    assert checked.llm_model == checked.model_used == "fallback-unsupported"
    assert checked.frases_retiradas == 2
    assert cacheable("fallback-unsupported") and cacheable("modelo-de-prueba")
    assert not any(cacheable(k) for k in ("fallback-busy", "fallback-timeout", "fallback-error"))


async def test_status_page_shows_state_and_addresses(served):
    async with served.session.get(served.url("/")) as resp:
        text = await resp.text()
    assert resp.status == 200
    assert "Listo para la clase" in text and "Dirección para los visores" in text
    assert "Actividad (últimos 10 minutos)" in text


async def test_health_counts_what_students_got_lately(served):
    async def activity() -> dict:
        async with served.session.get(served.url("/api/v1/health")) as resp:
            return (await resp.json())["activity"]

    before = await activity()
    body = {"age": 71, "pack_years": 12, "sensitive_tumor_volume": 33.0}
    first, _ = await post(served, body)
    again, _ = await post(served, body)  # the same buckets: a cache hit
    after = await activity()
    assert first == again == 200
    assert after["answers"] == before["answers"] + 2
    assert after["by_kind"].get("cache", 0) == before["by_kind"].get("cache", 0) + 1


def test_recent_answers_forget_what_left_the_window_and_warn_when_busy():
    from pulmomed_edge.activity import RecentAnswers
    from pulmomed_edge.http.status_page import _activity_section

    now = [0.0]
    recent = RecentAnswers(window_s=60, clock=lambda: now[0])
    for kind in ["modelo"] * 6 + ["cache"] * 2 + ["fallback-busy"] * 3:
        recent.record(kind)
    summary = recent.summary()
    assert summary["answers"] == 11 and summary["busy_share"] == round(3 / 11, 3)
    section = _activity_section(summary)
    assert "6 escritas por el modelo, 2 desde la caché, 3 resumidas" in section and "va justo" in section
    now[0] = 61.0
    recent.record("modelo")
    assert recent.summary()["answers"] == 1 and "va justo" not in _activity_section(recent.summary())
    assert "prepara la respuesta" not in _activity_section(recent.summary())
    with_backfill = {
        **recent.summary(),
        "backfill": {"pending": 2, "answered": 5, "running": 1, "started": 9},
    }
    assert "5 listas, 2 en espera" in _activity_section(with_backfill)
    assert "retiraron" not in _activity_section(with_backfill)
    trimmed = {**with_backfill, "grounding": {"answers": 12, "trimmed": 3, "sentences": 4}}
    assert "a 3 de 12 respuestas del modelo se les retiraron 4 frases" in _activity_section(trimmed)


async def test_prompts_share_everything_but_the_student_and_lead_with_the_stage(served):
    teacher = served.state.teacher
    llm = teacher.llm
    base = {"edad": 64, "pack_years": 30, "es_fumador": True, "volumen_tumor_sensible": 20.0}
    base |= {"volumen_tumor_resistente": 3.0, "tratamiento_activo": "quimio", "dias_tratamiento": 40}
    a = teacher.prepare(parse_state(base, teacher.library.ids))
    b = teacher.prepare(parse_state(base | {"edad": 41}, teacher.library.ids))
    assert [p.id for p in a.passages] == [p.id for p in b.passages]
    common = common_prefix(a.prompt, b.prompt)
    # everything up to the student's own line is shared, so a cached prefix covers it
    patient_at = len(llm.tokenize(_render(teacher, a).split("Paciente:")[0]))
    assert common >= patient_at - 3
    # the stage passage leads, and the fallback opens with it
    assert "estadio" in a.passages[0].texto.lower()
    fallback = teacher._fallback(a, "fallback-busy")
    assert a.passages[0].texto.split(".")[0] in fallback.explicacion


async def test_a_library_case_prompt_takes_its_stage_from_the_case_not_the_volume(served):
    teacher = served.state.teacher
    case = next(c for c in teacher.library.all() if "IV" in c.caso_id)
    body = {
        "modo": "biblioteca",
        "caso_id": case.caso_id,
        "edad": case.edad,
        "pack_years": case.pack_years,
        "volumen_tumor_sensible": case.volumen_inicial_sensible,
        "volumen_tumor_resistente": case.volumen_inicial_resistente,
    }
    prepared = teacher.prepare(parse_state(body, teacher.library.ids))
    text = _render(teacher, prepared)
    assert "estadio aproximado" not in text
    assert case.caso_id in prepared.passages[0].texto
    # the case passage reaches the prompt tightened to its first sentence, which does not say the
    # stage: the patient line does (the model contradicted SEER_007's stage IV with "IB")
    assert f"Paciente: estadio del caso: {case.estadio};" in text


async def test_a_library_case_prompt_shows_its_findings_not_its_diet(served):
    """The case passage's opening sentence is only who the patient is: with just that, the model
    invented SEER_005's findings («nódulos en el otro pulmón») and talked of diet."""
    teacher = served.state.teacher
    case = teacher.library.get("SEER_005_joven_nunca_fumador")
    body = {"edad": case.edad, "volumen_tumor_sensible": case.volumen_inicial_sensible}
    body |= {"modo": "biblioteca", "caso_id": case.caso_id}
    prepared = teacher.prepare(parse_state(body, teacher.library.ids))
    text = _render(teacher, prepared)
    assert "derrame pleural maligno" in text and "reordenamiento de ALK" in text
    assert "dieta" not in text
    # nor its internal id, which the model copied into students' text («El caso de biblioteca
    # SEER_003_mutacion_EGFR (…)»): the case passage opens with the patient
    assert "SEER_" not in text and "Fuentes:\n[1] Paciente de 34 años" in text


def _render(teacher, prepared) -> str:
    return render_prompt(teacher.llm.template, prepared.state, prepared.case, prepared.passages)


async def test_a_configured_max_new_tokens_below_the_minimum_answer_still_caps_it(served):
    from dataclasses import replace

    teacher, engine = served.state.teacher, served.state.engine
    original = teacher.config
    teacher.config = replace(original, max_new_tokens=40)
    before = engine.counters["new_tokens"]
    try:
        status, body = await post(served, {"age": 44, "pack_years": 12, "sensitive_tumor_volume": 33.0})
    finally:
        teacher.config = original
    assert status == 200 and generated(body["llm_model"], "smollm2-135m-instruct-q4_1")
    assert engine.counters["new_tokens"] - before <= 40
