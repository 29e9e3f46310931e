"""Shared fixtures: the real test models, a real index built once, a real server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from pulmomed_edge.config import CORPUS_DIR, Settings, manifest_path

REPO = Path(__file__).resolve().parent.parent
SEED = {"age": 55, "pack_years": 30, "sensitive_tumor_volume": 5.0}


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The test model set, fetched and verified (make test fetches it; this also works alone)."""
    from pulmomed_edge.model_store import ModelStore

    path = Path(os.environ.get("PULMOMED_MODELS_DIR", REPO / "models"))
    store = ModelStore(path, manifest_path())
    store.fetch(store.set_names("test"), progress=False)
    return path


@pytest.fixture(scope="session")
def encoder_bundle(models_dir: Path):
    from pulmomed_edge.embeddings import EmbeddingEncoder
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    name = store.default_name("embeddings", test=True)
    encoder = EmbeddingEncoder(store.verify(name), store.verify(store.default_name("tokenizer", test=True)))
    yield encoder, store.entry(name).sha256
    encoder.close()


@pytest.fixture(scope="session")
def built_index_dir(tmp_path_factory: pytest.TempPathFactory, encoder_bundle) -> Path:
    """The shipped corpus embedded into a real hnswlib index, once per test session."""
    from pulmomed_edge.corpus import load_corpus
    from pulmomed_edge.index import KnowledgeIndex

    encoder, sha = encoder_bundle
    out = tmp_path_factory.mktemp("index") / "current"
    KnowledgeIndex.build(load_corpus(CORPUS_DIR), encoder, out, encoder_sha256=sha, progress=False).close()
    return out


@pytest.fixture(scope="session")
def settings(models_dir: Path, built_index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        test_models=True,
        models_dir=models_dir,
        index_dir=built_index_dir,
        log_dir=tmp_path_factory.mktemp("logs"),
        slots=4,
        threads=1,
        budget_s=60.0,  # the test model is fast; a generous budget keeps the suite deterministic
        rate_limit_per_min=0,
        # background generations would run between tests and move the engine counters some tests
        # read; backfill is tested on a server of its own (test_classroom.py)
        backfill=False,
        # the model writes both sections here, so the suite covers that path (the pinned models'
        # default, recommendations from the sources, has tests of its own: test_answer_origin.py)
        recommendation="model",
    )


class Served:
    """A real server on a loopback port and a client session that talks to it."""

    def __init__(self, server: TestServer, session: ClientSession) -> None:
        self.server = server
        self.session = session

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def state(self):
        from pulmomed_edge.app import STATE

        return self.server.app[STATE]


async def start_server(settings: Settings, *, wait: bool = True) -> tuple[TestServer, ClientSession]:
    from pulmomed_edge.app import create_app

    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    session = ClientSession()
    if wait:
        await wait_ready(server, session)
    return server, session


async def wait_ready(
    server: TestServer, session: ClientSession, timeout: float = 120.0, poll: float = 0.1
) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with session.get(server.make_url("/api/v1/health")) as resp:
            body = await resp.json()
        if body["status"] != "starting":
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"server still starting: {body}")
        await asyncio.sleep(poll)


async def health(served: Served) -> tuple[int, dict]:
    """GET /api/v1/health: its status code and body."""
    async with served.session.get(served.url("/api/v1/health")) as resp:
        return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def own_server(settings: Settings, *, wait: bool = True) -> AsyncIterator[Served]:
    """A server of a test's own (other settings than the shared one), closed afterwards."""
    server, session = await start_server(settings, wait=wait)
    try:
        yield Served(server, session)
    finally:
        await session.close()
        await server.close()


@pytest.fixture(scope="session")
async def served(settings: Settings) -> AsyncIterator[Served]:
    async with own_server(settings) as shared:
        yield shared


@pytest.fixture
def seed() -> dict:
    return dict(SEED)


def cli_env(settings: Settings, tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment for running the CLI in its own process on the test models and index."""
    return dict(
        os.environ,
        PULMOMED_MODELS_DIR=str(settings.models_dir),
        PULMOMED_INDEX_DIR=str(settings.index_dir),
        PULMOMED_LOG_DIR=str(tmp_path / "logs"),
        PULMOMED_THREADS="1",
        **variables,
    )


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 300, encoding: str = "utf-8"
) -> subprocess.CompletedProcess:
    """`pulmomed-edge ARGS` in its own process, as the admin runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pulmomed_edge", *args],
        env=env,
        capture_output=True,
        encoding=encoding,
        timeout=timeout,
    )


def generated(llm_model: str, name: str) -> bool:
    """The answer came out of a generation (not a busy, timeout or error path): the model's, or the
    grounded summary when the check kept none of its sentences — which, with the 135M test model,
    is most answers (its sentences are mostly withheld, and a bare "1." no longer counts)."""
    return llm_model in (name, "fallback-unsupported")


def case_request(case) -> dict:
    """The request a headset sends for a library case: the case's own patient and volumes."""
    return {
        "edad": case.edad,
        "es_fumador": case.es_fumador,
        "pack_years": case.pack_years,
        "dieta": case.dieta,
        "volumen_tumor_sensible": case.volumen_inicial_sensible,
        "volumen_tumor_resistente": case.volumen_inicial_resistente,
        "modo": "biblioteca",
        "caso_id": case.caso_id,
    }


def with_settings(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)


async def read_stream(served: Served, body: dict) -> list[tuple[str, dict]]:
    """The events of `POST /api/v1/consultar_profesor/stream` for `body`, as (name, data), in order."""
    events = []
    async with served.session.post(served.url("/api/v1/consultar_profesor/stream"), json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        name = ""
        async for raw in resp.content:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events
