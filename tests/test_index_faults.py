"""Index files a lab machine can throw at the loader: odd characters in a passage, a file another
program holds or this user may not read, an index of the previous format, a hand-edited manifest,
another tokenizer. Each is a KnowledgeIndexError that says what to do, never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pulmomed_edge.config import manifest_path
from pulmomed_edge.corpus import Passage
from pulmomed_edge.errors import KnowledgeIndexError
from pulmomed_edge.index import BUILD_FIX, FORMAT_VERSION, KnowledgeIndex, damage, make_index_id, stale_reason
from pulmomed_edge.lexical import LexicalIndex
from pulmomed_edge.retrieval import Retriever

PASSAGES = [
    Passage("ecog-1", "Escala ECOG", "F", ("ecog",), "La escala ECOG mide el estado funcional del paciente."),
    Passage("cribado-1", "Cribado", "F", ("cribado",), "El cribado anual usa una TC de baja dosis."),
    Passage("radon-1", "Radón", "F", ("radon",), "El radón es la segunda causa de cáncer de pulmón."),
]


@pytest.fixture
def encoder(encoder_bundle):
    return encoder_bundle[0]


@pytest.fixture
def encoder_sha(encoder_bundle) -> str:
    return encoder_bundle[1]


def _build(passages: list[Passage], encoder, encoder_sha: str, out: Path) -> Path:
    KnowledgeIndex.build(passages, encoder, out, encoder_sha256=encoder_sha, progress=False).close()
    return out


def _load(index_dir: Path, encoder, encoder_sha: str) -> KnowledgeIndex:
    return KnowledgeIndex.load(
        index_dir, encoder_sha256=encoder_sha, dim=encoder.dim, encoder_settings=encoder.settings
    )


@pytest.fixture
def small_index(tmp_path, encoder, encoder_sha) -> Path:
    return _build(PASSAGES, encoder, encoder_sha, tmp_path / "index")


def _edit_manifest(index_dir: Path, edit) -> None:
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")


# --- what a passage may contain ------------------------------------------------------------


def test_passages_with_unicode_line_separators_build_an_index_that_loads(tmp_path, encoder, encoder_sha):
    odd = Passage("sep-1", "Separadores", "F", ("x",), "Una línea\u2028otra\u2029otra más\u0085y la última.")
    index_dir = _build([*PASSAGES, odd], encoder, encoder_sha, tmp_path / "index")
    loaded = _load(index_dir, encoder, encoder_sha)
    assert loaded.passages[-1] == odd
    assert damage(index_dir) is None


# --- files read by Python, the graph rebuilt the same --------------------------------------


def test_index_files_are_written_and_read_without_hnswlib_file_io(
    tmp_path, encoder, encoder_sha, monkeypatch
):
    import hnswlib

    def no_native_paths(*args, **kwargs):
        raise AssertionError("hnswlib must not open files: its narrow paths break C:\\Users\\José")

    monkeypatch.setattr(hnswlib.Index, "save_index", no_native_paths)
    monkeypatch.setattr(hnswlib.Index, "load_index", no_native_paths)
    built = KnowledgeIndex.build(
        PASSAGES, encoder, tmp_path / "índice José", encoder_sha256=encoder_sha, progress=False
    )
    loaded = _load(tmp_path / "índice José", encoder, encoder_sha)
    with open(tmp_path / "índice José" / "index.bin", "rb") as fh:
        vectors = np.load(fh, allow_pickle=False)
    assert vectors.shape == (len(PASSAGES), encoder.dim) and vectors.dtype == np.float32
    for passage in PASSAGES:  # the graph rebuilt at load answers exactly like the one built
        query = encoder.encode_one(passage.texto)
        assert loaded.search(query, 3) == built.search(query, 3)
        assert loaded.similarities(query, [0, 1, 2]) == built.similarities(query, [0, 1, 2])


def test_an_index_of_the_previous_format_asks_for_a_rebuild(small_index, encoder, encoder_sha):
    def previous_format(manifest: dict) -> None:
        manifest["format_version"] = FORMAT_VERSION - 1
        del manifest["encoder_settings"]

    _edit_manifest(small_index, previous_format)
    with pytest.raises(KnowledgeIndexError) as excinfo:
        _load(small_index, encoder, encoder_sha)
    assert excinfo.value.fix == BUILD_FIX and "rebuild" in excinfo.value.message
    assert "format" in stale_reason(small_index, PASSAGES, encoder_sha)


# --- files that cannot be read ---------------------------------------------------------------


def _replace_by_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()  # opening it fails even for root: IsADirectoryError (on Windows, PermissionError)


def _make_unreadable(path: Path) -> None:
    if sys.platform == "win32" or os.geteuid() == 0:
        pytest.skip("permission bits do not stop this user from reading")
    path.chmod(0)


@pytest.mark.parametrize(
    "block", [_replace_by_folder, _make_unreadable], ids=["folder-in-its-place", "chmod-000"]
)
@pytest.mark.parametrize("name", ["manifest.json", "index.bin", "passages.jsonl"])
def test_an_unreadable_index_file_is_named_with_how_to_free_it(
    small_index, encoder, encoder_sha, name, block
):
    path = small_index / name
    block(path)
    with pytest.raises(KnowledgeIndexError) as excinfo:
        _load(small_index, encoder, encoder_sha)
    assert f"cannot read {path}" in excinfo.value.message and str(path) in excinfo.value.mensaje
    assert "close" in excinfo.value.fix and "read" in excinfo.value.fix
    assert f"cannot read {path}" in damage(small_index)


# --- a hand-edited manifest ------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.update(params=None), id="params-null"),
        pytest.param(lambda m: m["params"].update(ef_search="auto"), id="ef_search-text"),
        pytest.param(lambda m: m["params"].update(M=0), id="M-zero"),
        pytest.param(lambda m: m["params"].pop("ef_construction"), id="ef_construction-missing"),
        pytest.param(lambda m: m.update(encoder_settings=[]), id="encoder_settings-list"),
        pytest.param(lambda m: m.update(passage_count="3"), id="passage_count-text"),
    ],
)
def test_a_hand_edited_manifest_asks_for_a_rebuild(small_index, encoder, encoder_sha, edit):
    _edit_manifest(small_index, edit)
    with pytest.raises(KnowledgeIndexError) as excinfo:
        _load(small_index, encoder, encoder_sha)
    assert excinfo.value.fix == BUILD_FIX
    assert damage(small_index) is not None


# --- the encoder's settings are part of the index's identity ----------------------------------


def test_the_index_records_the_encoders_settings_and_tokenizer(small_index, encoder, encoder_sha, models_dir):
    from pulmomed_edge.model_store import ModelStore

    store = ModelStore(models_dir, manifest_path())
    tokenizer = store.verify(store.default_name("tokenizer", test=True))
    recorded = json.loads((small_index / "manifest.json").read_text(encoding="utf-8"))["encoder_settings"]
    assert recorded == encoder.settings
    assert recorded["tokenizer_sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert {"max_tokens", "pooling"} <= set(recorded)


@pytest.mark.parametrize(
    ("setting", "value"), [("tokenizer_sha256", "0" * 64), ("max_tokens", 512), ("pooling", "cls")]
)
def test_an_index_built_with_other_encoder_settings_is_stale_and_refused(
    small_index, encoder, encoder_sha, setting, value
):
    _edit_manifest(small_index, lambda m: m["encoder_settings"].update({setting: value}))
    reason = stale_reason(small_index, PASSAGES, encoder_sha, encoder_settings=encoder.settings)
    assert reason is not None and setting in reason
    with pytest.raises(KnowledgeIndexError) as excinfo:
        _load(small_index, encoder, encoder_sha)
    assert excinfo.value.fix == BUILD_FIX
    if setting != "tokenizer_sha256":  # `index build --if-stale` passes no encoder settings yet
        assert setting in stale_reason(small_index, PASSAGES, encoder_sha)


def test_the_index_id_changes_with_the_encoder_settings(encoder):
    params = {"space": "cosine", "ef_construction": 200, "M": 16, "ef_search": 64}
    other = {**encoder.settings, "max_tokens": 128}
    assert make_index_id("c", "e", params, encoder.settings) != make_index_id("c", "e", params, other)


# --- passages without a searchable word --------------------------------------------------------


def test_passages_without_a_searchable_word_still_search(tmp_path, encoder, encoder_sha):
    only_stopwords = [Passage("c-1", "¿Qué?", "F", (), "y de la que es"), Passage("c-2", "¿Y?", "F", (), "—")]
    index = _load(_build(only_stopwords, encoder, encoder_sha, tmp_path / "index"), encoder, encoder_sha)
    retriever = Retriever(index, encoder, LexicalIndex(index.passages))
    hits = retriever.search("escala ECOG", k=5)
    assert [h.passage.id for h in hits] and all(h.lexical == 0.0 for h in hits)
