"""Whatever a headset (or anything else on the LAN) sends, the answer is a field-named Spanish JSON
error or a real answer: never a 500, never an exception that escapes validation.

The schema is exercised with generated bodies (hypothesis); the HTTP layer with the bodies that
once reached past it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import API, post

from pulmomed_edge.canonical import canonicalize, patient_stage, retrieval_queries
from pulmomed_edge.prompts import user_message
from pulmomed_edge.schema import FIELD_ALIASES, InvalidRequest, SimulationState, parse_state

CASE_IDS = frozenset({"SEER_001_estadio_IA", "SEER_004_estadio_IV_metastasis"})
NAMES = sorted(set(FIELD_ALIASES) | set(FIELD_ALIASES.values()))
ENUM_WORDS = [
    "saludable", "normal", "mala", "ninguno", "quimio", "radio", "inmuno", "libre", "biblioteca",
    "sano", "en_riesgo", "estable", "progresando", "critico", "terminal", *CASE_IDS,
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ENUM_WORDS),
    st.text(max_size=20),  # includes lone surrogates and control characters
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=12), values, max_size=10)


# the same examples every run (CI must not fail by luck) and no example database in the checkout
REPEATABLE = {"derandomize": True, "database": None, "deadline": None}


def _english(message: str) -> bool:
    return "Input should" in message or " or " in message


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], **REPEATABLE)
@given(bodies)
def test_any_body_is_a_state_or_errors_that_name_its_fields(body):
    try:
        state = parse_state(body, CASE_IDS)
    except InvalidRequest as exc:
        assert exc.problems
        for problem in exc.problems:
            # the field as the client wrote it (or a contract name when it is missing)
            assert problem.campo in body or problem.campo in FIELD_ALIASES, (problem, body)
            assert problem.mensaje and not _english(problem.mensaje), problem
        json.dumps(exc.body(), ensure_ascii=False).encode("utf-8")
        return
    # what a valid state feeds: bands, the stage, the retrieval queries and the prompt's text
    c = canonicalize(state)
    assert math.isfinite(state.edad) and 18 <= state.edad <= 100
    queries = retrieval_queries(c, None)
    assert queries and patient_stage(c, None)
    user_message([], c, None).encode("utf-8")
    c.key_material().encode("utf-8")


valid_bodies = st.fixed_dictionaries(
    {
        "edad": st.integers(18, 100),
        "volumen_tumor_sensible": st.floats(0, 1e6),
    },
    optional={
        "es_fumador": st.booleans(),
        "pack_years": st.floats(0, 150),
        "dias_desde_cambio": st.integers(0, 10**6),
        "dieta": st.sampled_from(["saludable", "normal", "mala"]),
        "volumen_tumor_resistente": st.floats(0, 1e6),
        "tratamiento_activo": st.sampled_from(["ninguno", "quimio", "radio", "inmuno"]),
        "dias_tratamiento": st.integers(0, 10**6),
        "lung_state": st.sampled_from([None, "sano", "critico", "terminal"]),
    },
)


@settings(max_examples=200, **REPEATABLE)
@given(valid_bodies)
def test_every_body_inside_the_contract_is_accepted(body):
    state = parse_state(body, CASE_IDS)
    assert isinstance(state, SimulationState)
    assert canonicalize(state).stage


@pytest.mark.parametrize(
    ("raw", "status", "campo"),
    [
        (b"[" * 60_000, 400, None),  # the decoder recursed and the server answered 500
        (b'{"edad": ' + b"[" * 5_000 + b"]" * 5_000 + b', "volumen_tumor_sensible": 1}', 400, None),
        (b'{"edad": 50, "volumen_tumor_sensible": 1, "dieta": "\\ud800"}', 422, "dieta"),
        (b'{"age": 50, "sensitive_tumor_volume": 1, "diet": "vegana"}', 422, "diet"),
        (b'{"edad": 1' + b"0" * 4_000 + b', "volumen_tumor_sensible": 1}', 422, "edad"),
        (b'{"edad": 50, "volumen_tumor_sensible": 1e400}', 422, "volumen_tumor_sensible"),
        (b'{"edad": 50, "volumen_tumor_sensible": {"cm3": 1}}', 422, "volumen_tumor_sensible"),
    ],
)
@pytest.mark.parametrize("path", [API, API + "/stream"])
async def test_hostile_bodies_get_a_json_error_and_the_server_goes_on(served, seed, raw, status, campo, path):
    got, answer = await post(served, None, raw=raw, path=path)
    assert got == status, answer
    assert answer["error"]
    if campo is not None:
        problem = next(d for d in answer["detalles"] if d["campo"] == campo)
        assert not _english(problem["mensaje"]), problem
    ok, _ = await post(served, seed)
    assert ok == 200
