"""The lab admin's `index build`: lab folders kept across rebuilds, clear refusals, unique ids,
damage noticed, and what each folder added. Real files, real builds through the CLI's `main`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from pulmomed_edge.cli import main
from pulmomed_edge.embeddings import EmbeddingEncoder
from pulmomed_edge.index import KnowledgeIndex

GUIA = (
    "Fuente: Protocolo del hospital 2024\n\n# Cribado\n\nCribado anual con TC de baja dosis en fumadores.\n"
)


@pytest.fixture
def admin(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Runs `pulmomed-edge index build …` in-process on a 3-passage corpus and a tmp index dir."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [
        {
            "id": f"c-{n}",
            "titulo": f"Tema {n}",
            "fuente": "F",
            "temas": ["x"],
            "texto": f"Pasaje {n} de pulmón.",
        }
        for n in range(3)
    ]
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    index_dir = tmp_path / "index" / "current"
    monkeypatch.setenv("PULMOMED_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("PULMOMED_INDEX_DIR", str(index_dir))
    monkeypatch.chdir(tmp_path)

    class Admin:
        index = index_dir
        corpus_dir = corpus

        def build(self, *args: str) -> tuple[int, str, str]:
            return self.build_bare("--corpus", str(corpus), *args)

        def build_bare(self, *args: str) -> tuple[int, str, str]:
            """Without --corpus: the one recorded, or the shipped one."""
            code = main(["index", "build", *args])
            out, err = capsys.readouterr()
            return code, out, err

        def passages(self) -> list[dict]:
            lines = (index_dir / "passages.jsonl").read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines]

        def ids(self) -> list[str]:
            return [p["id"] for p in self.passages()]

        def manifest(self) -> dict:
            return json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))

    return Admin()


def _folder(root: Path, name: str, files: dict[str, str | bytes]) -> Path:
    folder = root / name
    folder.mkdir()
    for file_name, content in files.items():
        path = folder / file_name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


# --- 1. the lab's folders survive `make run` (index build --if-stale without --add) --------------


def test_build_without_add_reuses_the_recorded_lab_folders(admin, tmp_path):
    lab = _folder(tmp_path, "lab", {"guia.md": GUIA})
    assert admin.build("--add", "lab")[0] == 0  # a relative path is recorded absolute
    assert admin.manifest()["lab_documents"] == [str(lab.resolve())]
    assert "doc-guia-1" in admin.ids()

    code, out, _ = admin.build("--if-stale")  # what `make run` does
    assert code == 0 and "index up to date" in out and "reusing" in out

    (lab / "guia.md").write_text(GUIA + "\nSegundo párrafo nuevo.\n", encoding="utf-8")
    code, out, _ = admin.build("--if-stale")  # the lab edited its document: rebuilt, with it
    assert code == 0 and "built" in out
    assert "restart it to use this" in out  # a running server keeps the index it loaded
    assert "doc-guia-1" in admin.ids()
    assert admin.manifest()["lab_documents"] == [str(lab.resolve())]

    code, out, _ = admin.build()  # the fix text of a broken index: `pulmomed-edge index build`
    assert code == 0 and "doc-guia-1" in admin.ids()


def test_a_recorded_lab_folder_that_is_gone_is_an_error_saying_how_to_drop_it(admin, tmp_path):
    lab = _folder(tmp_path, "lab", {"guia.md": GUIA})
    assert admin.build("--add", str(lab))[0] == 0
    shutil.rmtree(lab)
    # before class (`make run`: --if-stale) the whole current index is kept, with a warning
    code, _, err = admin.build("--if-stale")
    assert code == 0 and "keeping the current index" in err and str(lab) in err
    assert "doc-guia-1" in admin.ids()
    code, _, err = admin.build()  # a rebuild cannot include it: say how to drop it
    assert code == 1
    assert "error:" in err and str(lab) in err and "--no-lab-docs" in err
    assert "Traceback" not in err

    code, out, _ = admin.build("--no-lab-docs")
    assert code == 0 and str(lab) in out
    assert admin.ids() == ["c-0", "c-1", "c-2"]
    assert admin.manifest()["lab_documents"] == []


def test_add_chooses_the_folders_and_says_which_recorded_ones_it_drops(admin, tmp_path):
    first = _folder(tmp_path, "first", {"guia.md": GUIA})
    second = _folder(tmp_path, "second", {"otra.md": GUIA})
    assert admin.build("--add", str(first))[0] == 0
    code, out, _ = admin.build("--add", str(second))
    assert code == 0 and f"no longer in the index: {first}" in out
    assert admin.manifest()["lab_documents"] == [str(second)]
    assert [i for i in admin.ids() if i.startswith("doc-")] == ["doc-otra-1"]


def test_a_custom_corpus_is_recorded_and_used_again_by_a_build_without_corpus(admin, tmp_path, monkeypatch):
    from pulmomed_edge import cli

    assert admin.build()[0] == 0
    assert admin.manifest()["corpus"] == str(admin.corpus_dir.resolve())
    code, out, _ = admin.build_bare("--if-stale")  # `make run`: it used to rebuild from the shipped one
    assert code == 0 and "reusing the corpus recorded" in out and "index up to date" in out
    assert admin.ids() == ["c-0", "c-1", "c-2"]

    one = {"id": "s-0", "titulo": "T", "fuente": "F", "temas": [], "texto": "Pasaje incluido."}
    shipped = _folder(tmp_path, "shipped", {"s.jsonl": json.dumps(one) + "\n"})
    monkeypatch.setattr(cli, "CORPUS_DIR", shipped)  # the shipped corpus, small for the test
    code, out, _ = admin.build_bare("--shipped-corpus")
    assert code == 0 and admin.ids() == ["s-0"] and admin.manifest()["corpus"] is None
    code, out, _ = admin.build_bare("--if-stale")  # nothing recorded: the shipped one, as before
    assert code == 0 and "index up to date" in out and "reusing" not in out
    assert admin.build_bare("--corpus", str(shipped))[0] == 0
    assert admin.manifest()["corpus"] is None  # named by hand, still the shipped one


def test_a_recorded_corpus_that_is_gone_keeps_the_index_before_class_and_says_how_to_go_on(admin, tmp_path):
    moved = tmp_path / "corpus-copy"
    shutil.copytree(admin.corpus_dir, moved)
    assert admin.build_bare("--corpus", str(moved))[0] == 0
    shutil.rmtree(moved)
    code, _, err = admin.build_bare("--if-stale")
    assert code == 0 and "keeping the current index" in err and str(moved) in err
    code, _, err = admin.build_bare()
    assert code == 1 and str(moved) in err and "--shipped-corpus" in err and "Traceback" not in err


# --- 2. clear messages instead of tracebacks ---------------------------------------------------


def test_add_of_a_missing_folder_is_a_clear_error(admin, tmp_path):
    code, _, err = admin.build("--add", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in err and "no existe" in err and str(tmp_path / "nowhere") in err
    assert not admin.index.exists()


def test_add_of_a_file_is_a_clear_error_naming_its_folder(admin, tmp_path):
    lab = _folder(tmp_path, "lab", {"guia.md": GUIA})
    code, _, err = admin.build("--add", str(lab / "guia.md"))
    assert code == 1 and "is a file, not a folder" in err and f"--add {lab}" in err


def test_windows_1252_document_is_read_and_said_so(admin, tmp_path):
    text = "Fuente: Hospital Clínico\n\nRadiación torácica y esofagitis: señales de alarma.\n"
    _folder(tmp_path, "lab", {"notas.txt": text.encode("cp1252")})
    code, out, _ = admin.build("--add", "lab")
    assert code == 0 and "notas.txt: not UTF-8, read as Windows-1252" in out
    (passage,) = [p for p in admin.passages() if p["id"] == "doc-notas-1"]
    assert passage["fuente"] == "Hospital Clínico" and "Radiación torácica" in passage["texto"]


def test_utf8_document_with_a_byte_order_mark_is_accepted(admin, tmp_path):
    _folder(tmp_path, "lab", {"bom.md": b"\xef\xbb\xbf" + GUIA.encode("utf-8")})
    code, out, err = admin.build("--add", "lab")
    assert code == 0, err
    assert "not UTF-8" not in out
    (passage,) = [p for p in admin.passages() if p["id"] == "doc-bom-1"]
    assert passage["fuente"] == "Protocolo del hospital 2024"


def test_an_index_dir_inside_a_file_is_refused_before_embedding(admin, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("PULMOMED_INDEX_DIR", str(tmp_path / "a-file" / "current"))
    code, _, err = admin.build()
    assert code == 1 and "cannot write the index" in err and "PULMOMED_INDEX_DIR" in err
    assert "Embedding passages" not in err


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """An existing folder this process cannot create files in."""
    if sys.platform == "win32":
        pytest.skip("Windows folders ignore the read-only bit")
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # root writes through permission bits; sysfs refuses new entries even to root
    try:
        shutil.rmtree(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no folder here refuses root's writes")


def test_a_read_only_index_dir_is_refused_before_embedding(admin, unwritable_dir, monkeypatch):
    monkeypatch.setenv("PULMOMED_INDEX_DIR", str(unwritable_dir / "pulmomed-index"))
    code, _, err = admin.build()
    assert code == 1 and "cannot write the index" in err and "No se puede escribir" in err
    assert "Embedding passages" not in err


# --- 3. passage ids are unique across the whole index ------------------------------------------


def test_same_named_documents_get_unique_deterministic_ids(admin, tmp_path):
    two_chunks = GUIA + "\n\n" + " ".join(f"palabra{n}" for n in range(200)) + "\n"
    _folder(tmp_path, "a", {"guia-txt.md": GUIA, "guia.md": two_chunks, "guia.txt": GUIA})
    _folder(tmp_path, "b", {"guia.md": GUIA})
    code, out, err = admin.build("--add", "a", "--add", "b")
    assert code == 0, err
    ids = admin.ids()
    assert len(ids) == len(set(ids)) == 3 + 5
    assert ids[3:] == ["doc-guia-txt-1", "doc-guia-1", "doc-guia-2", "doc-a-guia-1", "doc-guia-md-1"]
    assert "guia.txt: ids doc-a-guia-N (its name's ids were taken)" in out
    assert admin.build("--add", "a", "--add", "b")[0] == 0
    assert admin.ids() == ids  # the same folders give the same ids


def test_an_index_with_duplicate_ids_is_never_built(tmp_path, encoder_bundle):
    from pulmomed_edge.corpus import Passage
    from pulmomed_edge.errors import KnowledgeIndexError

    encoder, sha = encoder_bundle
    twins = [Passage("doc-guia-1", "T", "F", ("x",), texto) for texto in ("uno", "dos")]
    with pytest.raises(KnowledgeIndexError, match="doc-guia-1"):
        KnowledgeIndex.build(twins, encoder, tmp_path / "index", encoder_sha256=sha, progress=False)


# --- 4. --if-stale notices a damaged index -----------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: _flip_byte(d / "index.bin"), id="flipped-byte-in-index.bin"),
        pytest.param(lambda d: (d / "passages.jsonl").unlink(), id="deleted-passages.jsonl"),
    ],
)
def test_if_stale_rebuilds_a_damaged_index(admin, encoder_bundle, damage):
    assert admin.build()[0] == 0
    damage(admin.index)
    code, out, _ = admin.build("--if-stale")
    assert code == 0 and "up to date" not in out and "rebuilding" in out
    encoder, sha = encoder_bundle
    KnowledgeIndex.load(admin.index, encoder_sha256=sha, dim=encoder.dim).close()


def test_if_stale_rebuilds_an_index_of_the_previous_format(admin, encoder_bundle):
    assert admin.build()[0] == 0
    manifest = admin.manifest()
    manifest["format_version"] = 1
    del manifest["encoder_settings"]
    (admin.index / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    code, out, _ = admin.build("--if-stale")  # `make run` after an upgrade
    assert code == 0 and "rebuilding the index (the index has format 1" in out and "rebuild it" in out
    assert admin.manifest()["format_version"] == 2
    encoder, sha = encoder_bundle
    KnowledgeIndex.load(admin.index, encoder_sha256=sha, dim=encoder.dim).close()


def test_if_stale_rebuilds_when_the_encoders_token_limit_changed(admin, monkeypatch):
    from pulmomed_edge import embeddings

    assert admin.build()[0] == 0
    assert admin.build("--if-stale")[1].startswith("index up to date")
    monkeypatch.setattr(embeddings, "MAX_TOKENS", 128)
    code, out, _ = admin.build("--if-stale")
    assert code == 0 and "rebuilding the index (index was built with encoder max_tokens 256" in out
    assert admin.manifest()["encoder_settings"]["max_tokens"] == 128


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- 5. an empty corpus says where the passages should be ------------------------------------


def test_an_empty_corpus_is_refused_naming_the_corpus_folder(admin):
    (admin.corpus_dir / "a.jsonl").write_text("", encoding="utf-8")
    code, _, err = admin.build()
    corpus = str(admin.corpus_dir.resolve())
    assert code == 1 and "no passages to index" in err and "Traceback" not in err
    assert f"the *.jsonl files in {corpus}" in err and "index build --corpus DIR" in err


# --- 6. what each --add folder added -----------------------------------------------------------


def test_each_folder_reports_what_it_added_and_a_folder_with_none_warns(admin, tmp_path):
    _folder(tmp_path, "lab", {"guia.md": GUIA, "otra.txt": GUIA})
    _folder(tmp_path, "empty", {})
    mixed = _folder(tmp_path, "mixed", {"informe.pdf": b"%PDF-1.4", "notas.docx": b"PK"})
    (mixed / "anexos").mkdir()
    code, out, err = admin.build("--add", "lab", "--add", "empty", "--add", "mixed")
    assert code == 0
    assert f"{tmp_path / 'lab'}: 2 documents, 2 passages" in out
    assert f"warning: {tmp_path / 'empty'}: no .md/.txt documents" in err
    assert f"warning: {tmp_path / 'mixed'}: no .md/.txt documents" in err
    assert "1 .docx, 1 .pdf, 1 subfolder" in err
    assert "aviso:" in err


def test_a_build_removes_what_killed_builds_left_and_is_readable_by_other_accounts(admin):
    """Closing the console mid-build left its temp dir for good; the index was 0700, so a server
    running as the teacher's account could not read what the admin's account built."""
    parent = admin.index.parent
    parent.mkdir(parents=True)
    stale = parent / ".current.building-killed"
    fresh = parent / ".current.building-a-minute-ago"  # no build runs: it would hold the lock
    old_swap = parent / ".current.old-4242"
    for folder in (stale, fresh, old_swap):
        folder.mkdir()
        (folder / "index.bin").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    for folder in (stale, old_swap):
        os.utime(folder, (hours_ago, hours_ago))
    assert admin.build()[0] == 0
    assert not stale.exists() and not old_swap.exists() and not fresh.exists()
    if sys.platform != "win32":
        assert admin.index.stat().st_mode & 0o777 == 0o755


# --- 7. one build of an index at a time ---------------------------------------------------------


def _lock_is_free(index_dir: Path) -> bool:
    """No build holds the lock beside `index_dir` (taken here and let go at once)."""
    try:
        with FileLock(index_dir.parent / f".{index_dir.name}.lock", blocking=False):
            return True
    except Timeout:
        return False


def test_a_second_build_while_one_runs_is_refused_at_once_and_the_index_stays(admin, encoder_bundle):
    """Two builds swapped their temp folders into the same index at once: the second failed midway,
    saying the index folder could not be written."""
    assert admin.build()[0] == 0
    before = admin.manifest()
    lock = admin.index.parent / ".current.lock"
    with FileLock(lock, blocking=False):  # another console's build, still embedding
        code, _, err = admin.build()
    assert code == 1
    assert "another rebuild of the knowledge index" in err and "Ya hay otra reconstrucción" in err
    assert "wait for it to finish" in err and f"delete {lock}" in err
    assert "Embedding passages" not in err  # refused before any work
    assert admin.manifest() == before and not list(admin.index.parent.glob(".current.building-*"))
    encoder, sha = encoder_bundle
    KnowledgeIndex.load(
        admin.index, encoder_sha256=sha, dim=encoder.dim, encoder_settings=encoder.settings
    ).close()
    assert admin.build()[0] == 0  # once that build is over, the next one runs


def test_the_lock_is_let_go_after_a_build_and_after_one_that_failed(admin, monkeypatch):
    assert admin.build()[0] == 0
    assert _lock_is_free(admin.index)
    before = admin.manifest()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the admin pressed Ctrl+C while the passages were embedded

    monkeypatch.setattr(EmbeddingEncoder, "encode", interrupted)
    code, _, err = admin.build()
    assert code == 130 and "Embedding passages" in err  # it failed inside the build
    assert _lock_is_free(admin.index)
    assert admin.manifest() == before and not list(admin.index.parent.glob(".current.building-*"))


def test_a_lock_this_account_cannot_open_is_named_with_how_to_clear_it(admin):
    """The lock file stays after a build (on Linux and macOS): one made by another user account,
    or a folder in its place, must not read as an unwritable index folder."""
    assert admin.build()[0] == 0
    before = admin.manifest()
    lock = admin.index.parent / ".current.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # opening it fails even for root
    code, _, err = admin.build()
    assert code == 1 and f"cannot open the index's build lock {lock}" in err and f"delete {lock}" in err
    assert "Embedding passages" not in err and admin.manifest() == before
