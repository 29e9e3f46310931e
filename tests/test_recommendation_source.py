"""The recommendation from the sources (`PULMOMED_RECOMMENDATION`, "auto" = sources for the pinned
small models): the model writes the explanation alone, and the recommendation is the retrieved
guideline's own sentence, marked `fuentes` in `origen` and streamed like the model's would be.

Read in 32 real answers of the default 0.5B model, not one of its own recommendations was a correct
next step for the patient (tenth round, BENCHMARKS.md); the grounded summary's usually was."""

from __future__ import annotations

import pytest
from conftest import own_server, read_stream, with_settings

from pulmomed_edge.config import Settings
from pulmomed_edge.errors import SettingsError
from pulmomed_edge.schema import parse_state
from pulmomed_edge.teacher import answer_budget

API = "/api/v1/consultar_profesor"
BODY = {"edad": 67, "es_fumador": True, "pack_years": 40, "volumen_tumor_sensible": 30.0}


def test_auto_takes_the_recommendation_from_the_sources_for_the_pinned_models_only():
    assert Settings().recommendation_from_sources(model_added=False)
    assert not Settings().recommendation_from_sources(model_added=True)  # the lab's 3B writes it
    assert Settings(recommendation="sources").recommendation_from_sources(model_added=True)
    assert not Settings(recommendation="model").recommendation_from_sources(model_added=False)
    with pytest.raises(SettingsError, match="PULMOMED_RECOMMENDATION"):
        Settings.from_env({"PULMOMED_RECOMMENDATION": "both"})


def test_the_explanation_alone_has_the_explanations_budget():
    both, alone = answer_budget(160), answer_budget(160, explanation_only=True)
    assert alone["max_new_tokens"] == both["phases"][0].hard_tokens < both["max_new_tokens"]
    (phase,) = alone["phases"]
    assert phase.soft_tokens == both["phases"][0].soft_tokens and not phase.transition


async def _stream(served, body) -> tuple[dict[str, str], dict]:
    """What each section streamed, and the `done` object."""
    streamed = {"explicacion": "", "recomendacion": ""}
    done = None
    for name, data in await read_stream(served, body):
        if name == "delta":
            streamed[data["seccion"]] += data["texto"]
        elif name == "done":
            done = data
    assert done is not None
    return streamed, done


async def test_the_model_writes_the_explanation_and_the_sources_the_recommendation(settings):
    async with own_server(with_settings(settings, recommendation="sources")) as served:
        teacher, engine = served.state.teacher, served.state.engine
        summary = teacher._extractive(teacher.prepare(parse_state(BODY, teacher.library.ids)))
        before = engine.counters["new_tokens"]
        streamed, done = await _stream(served, BODY)
        written = engine.counters["new_tokens"] - before
        # one generation, of the explanation alone (no "Recomendación:" was written)
        assert 0 < written <= answer_budget(settings.max_new_tokens, explanation_only=True)["max_new_tokens"]
        assert done["recomendacion"] == summary.recomendacion and "[" in done["recomendacion"]
        assert done["origen"]["recomendacion"] == "fuentes"
        # the stream carries it too, as one delta after the explanation
        assert streamed["recomendacion"] == done["recomendacion"]
        if done["origen"]["explicacion"] == "modelo":
            assert done["llm_model"] == teacher.llm.name and "Recomendación" not in done["explicacion"]
        else:  # the test model's sentences were all withheld
            assert done["llm_model"] == "fallback-unsupported"
        async with served.session.get(served.url("/api/v1/health")) as resp:
            activity = (await resp.json())["activity"]
        assert activity["recomendacion"] == "fuentes"
        # the JSON endpoint: the same answer, now from the cache
        async with served.session.post(served.url(API), json=BODY) as resp:
            body = await resp.json()
        assert body["recomendacion"] == summary.recomendacion and body["origen"] == done["origen"]
