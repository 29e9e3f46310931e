"""The server listens at once, says "starting" while loading, and names any broken part and its fix."""

from __future__ import annotations

import shutil
from dataclasses import replace

from conftest import SEED, own_server, wait_ready


async def test_health_is_503_starting_while_loading_then_200(settings):
    async with own_server(settings, wait=False) as served:
        server, session = served.server, served.session
        async with session.get(server.make_url("/api/v1/health")) as resp:
            first = await resp.json()
        assert resp.status == 503 and first["status"] == "starting"
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            busy = await resp.json()
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        assert "iniciando" in busy["error"]
        body = await wait_ready(server, session)
        assert body["status"] == "healthy"
        async with session.get(server.make_url("/api/v1/health")) as resp:
            assert resp.status == 200
            plan = (await resp.json())["components"]["llm"]["batch_plan"]
        assert {"prefill_rows", "decode_rows"} <= plan.keys()


async def test_unknown_model_answers_with_grounded_fallback_unavailable(settings):
    async with own_server(replace(settings, model="no-such-model")) as served:
        server, session = served.server, served.session
        async with session.get(server.make_url("/api/v1/health")) as resp:
            health = await resp.json()
        assert resp.status == 503 and health["status"] == "degraded"
        assert health["components"]["llm"]["status"] == "failed"
        assert "models add" in health["components"]["llm"]["fix"]
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["llm_model"] == "fallback-unavailable" == body["model_used"]
        assert body["fuentes"] and body["explicacion"] and body["recomendacion"]


async def test_corrupt_index_is_named_with_its_fix(settings, tmp_path):
    broken = tmp_path / "index"
    shutil.copytree(settings.index_dir, broken)
    (broken / "index.bin").write_bytes(b"not an index")
    async with own_server(replace(settings, index_dir=broken)) as served:
        server, session = served.server, served.session
        async with session.get(server.make_url("/api/v1/health")) as resp:
            health = await resp.json()
        assert resp.status == 503 and health["status"] == "degraded"
        assert health["components"]["index"]["status"] == "failed"
        assert "pulmomed-edge index build" in health["components"]["index"]["fix"]
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            body = await resp.json()
        assert resp.status == 503 and "componentes" in body
