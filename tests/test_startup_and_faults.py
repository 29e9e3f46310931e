"""The server listens at once, says "starting" while loading, and names any broken part and its fix."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import SEED, cli_env, health, own_server, run_cli, wait_ready

from pulmomed_edge.config import Settings
from pulmomed_edge.errors import SettingsError


@contextlib.contextmanager
def lab_model(store, path, name: str):
    """`path` registered as the lab's model `name` in the checkout's store for one test; the
    local manifest and the model's stamp are as before afterwards."""
    local = store.local_manifest_path
    before = local.read_bytes() if local.exists() else None
    store.add(path, name, progress=False)
    try:
        yield
    finally:
        store._stamp_path(store.entry(name)).unlink(missing_ok=True)
        if before is None:
            local.unlink(missing_ok=True)
        else:
            local.write_bytes(before)


async def test_health_is_503_starting_while_loading_then_200(settings):
    # the headsets' limit of 2 questions a minute: retries while starting must not use it up
    async with own_server(replace(settings, rate_limit_per_min=2), wait=False) as served:
        server, session = served.server, served.session
        async with session.get(server.make_url("/api/v1/health")) as resp:
            first = await resp.json()
        assert resp.status == 503 and first["status"] == "starting"
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            busy = await resp.json()
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        assert "iniciando" in busy["error"]
        answered = 0
        for _ in range(3):  # a headset retrying as Retry-After says (faster: the test's time)
            async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
                assert resp.status in (200, 503)
                answered += resp.status == 200  # ready already: these do count
        assert answered < 2, "the server was ready before the test could ask it while starting"
        body = await wait_ready(server, session, poll=0.01)
        assert body["status"] == "healthy"
        assert served.state.engine.running  # healthy means a question finds the engine running
        # once ready, its questions are answered: the 503s did not count against its limit
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            assert resp.status == 200, await resp.text()
        async with session.get(server.make_url("/api/v1/health")) as resp:
            assert resp.status == 200
            llm = (await resp.json())["components"]["llm"]
        assert {"prefill_rows", "decode_rows"} <= llm["batch_plan"].keys()
        assert llm["kv_layout"] == "unified"  # the default, shown where an admin looks


async def test_unknown_model_answers_with_grounded_fallback_unavailable(settings):
    async with own_server(replace(settings, model="no-such-model")) as served:
        server, session = served.server, served.session
        status, report = await health(served)
        assert status == 503 and report["status"] == "degraded"
        assert report["components"]["llm"]["status"] == "failed"
        assert "models add" in report["components"]["llm"]["fix"]
        # the names it offers are language models only (the tokenizer was offered, then refused)
        error = report["components"]["llm"]["error"]
        assert "smollm2-135m-instruct-q4_1" in error and "all-minilm" not in error
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["llm_model"] == "fallback-unavailable" == body["model_used"]
        assert body["fuentes"] and body["explicacion"] and body["recomendacion"]


async def test_a_missing_model_manifest_fails_every_part_instead_of_loading_for_ever(
    settings, tmp_path, monkeypatch
):
    """A bundle built without the manifest: the loader died on it and health said "starting"
    for ever, with nothing in the log."""
    from pulmomed_edge import app

    monkeypatch.setattr(app, "manifest_path", lambda: tmp_path / "models-manifest.json")
    async with own_server(settings) as served:
        status, report = await health(served)
    assert status == 503 and report["status"] == "degraded"
    for name in ("embeddings", "index", "llm"):
        part = report["components"][name]
        assert part["status"] == "failed" and "models-manifest.json" in part["error"]


async def test_corrupt_index_is_named_with_its_fix(settings, tmp_path):
    broken = tmp_path / "index"
    shutil.copytree(settings.index_dir, broken)
    (broken / "index.bin").write_bytes(b"not an index")
    async with own_server(replace(settings, index_dir=broken)) as served:
        server, session = served.server, served.session
        status, report = await health(served)
        assert status == 503 and report["status"] == "degraded"
        assert report["components"]["index"]["status"] == "failed"
        assert "pulmomed-edge index build" in report["components"]["index"]["fix"]
        # the teacher is told, in Spanish, who can run that command
        assert "administra este portátil" in report["components"]["index"]["solucion"]
        async with session.get(server.make_url("/")) as resp:
            page = await resp.text()
        assert "Solución: Avise a quien administra" in page and "<code>pulmomed-edge index build" in page
        async with session.post(server.make_url("/api/v1/consultar_profesor"), json=SEED) as resp:
            body = await resp.json()
        assert resp.status == 503 and "componentes" in body
        # search says the same, with the way out: it said "not available yet", retry in 5 s
        async with session.get(server.make_url("/api/v1/search"), params={"q": "egfr"}) as resp:
            body = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "30"
        assert "pulmomed-edge index build" in body["componentes"]["index"]["fix"]


async def test_grounding_check_is_off_for_a_model_the_lab_added_unless_asked_for(settings, tmp_path):
    """It was tuned on the pinned models: "auto" leaves a lab's own model alone; "1" forces it."""
    from pulmomed_edge.config import manifest_path
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(settings.models_dir, manifest_path())
    copy = tmp_path / "lab-model.gguf"
    shutil.copyfile(store.verify(store.default_name("llm", test=True)), copy)
    with lab_model(store, copy, "lab-model-under-test"):
        for value, enabled in (("auto", False), ("1", True)):
            changed = replace(settings, model="lab-model-under-test", grounding=value)
            async with own_server(changed) as served:
                _, body = await health(served)
            assert body["components"]["llm"]["model"] == "lab-model-under-test"
            assert body["activity"]["grounding"]["enabled"] is enabled
    assert Settings(grounding="auto").grounding_on(model_added=False)
    assert not Settings(grounding="0").grounding_on(model_added=False)
    with pytest.raises(ValueError, match="PULMOMED_GROUNDING"):
        Settings(grounding="sometimes")
    with pytest.raises(ValueError, match="PULMOMED_PARKED_PREFIXES"):
        Settings.from_env({"PULMOMED_PARKED_PREFIXES": "-1"})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("PULMOMED_SLOTS", "0"),  # the engine died at start-up with an IndexError
        ("PULMOMED_PREFILL_CHUNK", "0"),
        ("PULMOMED_PORT", "99999"),  # an OverflowError when binding
        ("PULMOMED_PORT", "abc"),
        ("PULMOMED_BACKFILL", "nope"),  # silently meant "off"
        ("PULMOMED_BUDGET_S", "nan"),
        ("PULMOMED_KV_LAYOUT", "stream"),
    ],
)
def test_a_setting_out_of_range_is_refused_naming_its_variable(variable, raw):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: raw})
    assert variable in caught.value.message and variable in caught.value.mensaje
    assert caught.value.fix


def test_a_flag_value_refused_is_named_as_the_flag_and_flags_win():
    """`serve --port 70000` was blamed on PULMOMED_PORT, which nobody had set."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({}, port=70000)
    assert "--port" in caught.value.message and "PULMOMED_PORT" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"PULMOMED_SLOTS": "4"}, slots=0)
    assert "--slots 0" in caught.value.message and "--slots" in caught.value.fix
    with pytest.raises(SettingsError, match="--budget"):
        Settings.from_env({}, budget_s=-1.0)
    with pytest.raises(SettingsError, match="PULMOMED_SLOTS"):  # the environment's own value
        Settings.from_env({"PULMOMED_SLOTS": "0"}, port=8000)
    # --test-models means the test models even with a model named in the environment
    assert Settings.from_env({"PULMOMED_MODEL": "qwen"}, test_models=True).model == Settings().model
    assert Settings.from_env({"PULMOMED_MODEL": "qwen"}).model == "qwen"


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("PULMOMED_SLOTS", "0"),
        ("PULMOMED_PORT", "0"),  # the system's choice: the banner told the teacher ":0"
    ],
)
def test_serve_with_a_bad_setting_says_so_without_a_traceback(tmp_path, variable, raw):
    env = dict(os.environ, PULMOMED_LOG_DIR=str(tmp_path), **{variable: raw})
    proc = run_cli("serve", "--test-models", env=env, timeout=120)
    assert proc.returncode == 1
    assert variable in proc.stderr and "Traceback" not in proc.stderr
    # the teacher who double-clicked it reads the way out in Spanish too
    assert f"solución: da a {variable} un valor válido" in proc.stderr


async def test_a_model_that_is_not_an_llm_or_does_not_load_is_named_with_its_fix(settings, tmp_path):
    """`--model` set to the tokenizer, or to a lab GGUF cut short in copying: health names the
    fault in Spanish and English and the way out (it was an English RuntimeError, or the server
    tried to load a tokenizer as a model)."""
    from pulmomed_edge.config import manifest_path
    from pulmomed_edge.model_store import ModelStore

    async with own_server(replace(settings, model="all-minilm-l6-v2-tokenizer")) as served:
        _, report = await health(served)
        llm = report["components"]["llm"]
        assert llm["status"] == "failed" and "no es un modelo de lenguaje" in llm["error"]
        assert "smollm2-135m-instruct-q4_1" in llm["fix"]

    store = ModelStore(settings.models_dir, manifest_path())
    whole = store.verify(store.default_name("llm", test=True))
    cut = tmp_path / "copia a medias.gguf"
    with whole.open("rb") as src:
        cut.write_bytes(src.read(2_000_000))  # the header and part of the weights
    with lab_model(store, cut, "copia-incompleta"):
        async with own_server(replace(settings, model="copia-incompleta")) as served:
            _, report = await health(served)
        llm = report["components"]["llm"]
        assert llm["status"] == "failed" and "incompleto" in llm["error"] and "incomplete" in llm["error"]
        assert "models add" in llm["fix"]


def test_serve_on_a_port_in_use_says_so_and_prints_no_addresses(settings, tmp_path):
    """A second PulmoMed Edge (or any program) on the port: one clear message and its fix; the
    banner with the headsets' addresses used to be printed first, as if it had started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(settings, tmp_path)
        proc = run_cli("serve", "--test-models", "--host", "127.0.0.1", "--port", str(port), env=env)
    assert proc.returncode == 1
    assert "PULMOMED_PORT" in proc.stderr and "Traceback" not in proc.stderr
    assert "Direcciones" not in proc.stderr
    # in Spanish as well, the OS's reason included (it says it in English)
    assert "otro programa ya usa ese puerto" in proc.stderr
    assert "solución: cierra el otro programa" in proc.stderr and "fix: close" in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C is a console event there, not a signal")
def test_ctrl_c_says_it_is_stopping(settings, tmp_path):
    """Answers still writing end with their summary before the process exits (seconds): the
    console said nothing meanwhile, so the stop looked like a hang."""
    import signal
    import time
    import urllib.request

    from pulmomed_edge.bench_server import free_port

    port = free_port()
    env = cli_env(settings, tmp_path)
    cmd = [sys.executable, "-m", "pulmomed_edge", "serve", "--test-models", "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the banner comes once the port is ours
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5)
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Deteniendo PulmoMed Edge" in err and "Traceback" not in err


def test_an_unknown_pulmomed_variable_is_named_as_a_likely_typo(settings, tmp_path):
    """PULMOMED_SLOT=4 (for PULMOMED_SLOTS) was ignored without a word."""
    from pulmomed_edge.config import unknown_variables

    assert unknown_variables({"PULMOMED_SLOT": "4", "PULMOMED_SLOTS": "4", "PULMOMED_LLAMA_LOG": "1"}) == [
        "PULMOMED_SLOT"
    ]
    env = cli_env(settings, tmp_path, PULMOMED_SLOT="4")
    proc = run_cli("models", "list", env=env, timeout=120)
    assert proc.returncode == 0 and "PULMOMED_SLOT is not a PulmoMed Edge setting" in proc.stderr
