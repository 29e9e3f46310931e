"""Retrieval contract: the real encoder, a real index built from the real corpus, real questions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import case_request

from pulmomed_edge.cache import ResponseCache
from pulmomed_edge.canonical import RESISTANCE_QUERY, canonicalize, retrieval_queries
from pulmomed_edge.cases import CaseLibrary
from pulmomed_edge.config import CORPUS_DIR
from pulmomed_edge.corpus import CHUNK_WORDS, _chunk_words, chunk_documents, corpus_hash, load_corpus
from pulmomed_edge.errors import CorpusError, KnowledgeIndexError
from pulmomed_edge.index import KnowledgeIndex, index_is_stale
from pulmomed_edge.lexical import LexicalIndex, tokenize
from pulmomed_edge.retrieval import Retriever, evaluate, measure_speed
from pulmomed_edge.schema import SimulationState
from pulmomed_edge.teacher import TeacherConfig, TeacherService

DATA = Path(__file__).resolve().parent / "data"
OFF_TOPIC = [
    "receta de tortilla de patatas",
    "¿quién ganó el mundial de fútbol?",
    "¿Cuál es la capital de Francia?",
    "cómo arreglar una bicicleta",
    "mejores videojuegos del año",
    "historia de la segunda guerra mundial",
]


# The models, the encoder and the built index come from conftest.py (one build per session).
@pytest.fixture(scope="session")
def encoder(encoder_bundle):
    return encoder_bundle[0]


@pytest.fixture(scope="session")
def encoder_sha(encoder_bundle) -> str:
    return encoder_bundle[1]


@pytest.fixture(scope="session")
def passages():
    return load_corpus(CORPUS_DIR)


@pytest.fixture(scope="session")
def built_dir(built_index_dir) -> Path:
    return built_index_dir


@pytest.fixture(scope="session")
def index(built_dir, encoder, encoder_sha):
    idx = KnowledgeIndex.load(built_dir, encoder_sha256=encoder_sha, dim=encoder.dim)
    yield idx
    idx.close()


@pytest.fixture(scope="session")
def retriever(index, encoder):
    return Retriever(index, encoder, LexicalIndex(index.passages))


@pytest.fixture
def index_copy(built_dir, tmp_path) -> Path:
    return Path(shutil.copytree(built_dir, tmp_path / "index"))


def _assert_rebuild_error(excinfo: pytest.ExceptionInfo) -> None:
    assert "pulmomed-edge index build" in excinfo.value.fix
    assert "pulmomed-edge index build" in str(excinfo.value)


# --- encoder -------------------------------------------------------------------------------


def test_encoder_output_is_unit_norm_and_deterministic(encoder):
    texts = ["El adenocarcinoma es el subtipo más frecuente.", "ECOG 2", "¿Qué es la inmunoterapia?"]
    first, second = encoder.encode(texts), encoder.encode(list(reversed(texts)))[::-1]
    assert first.shape == (3, encoder.dim) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.allclose(first, second, atol=1e-5)  # batch order and padding do not change a vector
    assert np.allclose(encoder.encode_one(texts[1]), first[1], atol=1e-5)


def test_similar_spanish_sentences_score_higher_than_unrelated(encoder):
    a, b, c = encoder.encode(
        [
            "El tabaco es la principal causa del cáncer de pulmón.",
            "Fumar cigarrillos provoca la mayoría de los tumores pulmonares.",
            "La paella valenciana lleva arroz, pollo y judías verdes.",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.1


def test_long_text_is_truncated_not_rejected(encoder):
    vector = encoder.encode_one("cáncer de pulmón " * 1000)
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


# --- retrieval quality ---------------------------------------------------------------------


def test_eval_queries_all_hit_in_top_3_with_grounded_top_hit(retriever):
    result = evaluate(retriever, DATA / "retrieval_eval.jsonl")
    assert result["n"] == 15
    assert result["hit@3"] == 1.0, result["misses"]
    assert result["grounded_top"] == 1.0


def test_extra_student_questions_mostly_hit_in_top_3(retriever):
    result = evaluate(retriever, DATA / "retrieval_extra.jsonl")
    assert result["hit@3"] >= 0.85, result["misses"]


@pytest.mark.parametrize(
    ("content", "where", "problem"),
    [
        (None, "missing.jsonl", "cannot be read"),
        ("", "missing.jsonl", "holds no queries"),
        ("\n\n", "missing.jsonl", "holds no queries"),
        ('{"query": "ecog"}\n', "missing.jsonl:1", "'any'"),
        ('{"query": "ecog", "any": ["ecog"]}\n{"any": ["ecog"]}\n', "missing.jsonl:2", "'query'"),
        ("{bad\n", "missing.jsonl:1", "invalid JSON"),
    ],
    ids=["missing", "empty", "blank-lines", "without-any", "without-query", "bad-json"],
)
def test_a_bad_eval_file_is_named_by_file_and_line(retriever, tmp_path, content, where, problem):
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError) as excinfo:
        evaluate(retriever, path)
    assert where in excinfo.value.message and problem in excinfo.value.message
    assert '"query"' in excinfo.value.fix


@pytest.mark.parametrize("query", OFF_TOPIC)
def test_off_topic_question_has_no_grounded_hits(retriever, query):
    hits = retriever.search(query, k=5)
    assert hits, "search still returns passages; the teacher decides by `grounded`"
    assert not any(h.grounded for h in hits), [(h.passage.id, h.dense, h.coverage) for h in hits]


@pytest.mark.parametrize("mode", ["dense", "lexical", "fused"])
def test_every_mode_returns_k_ranked_hits(index, encoder, mode):
    retriever = Retriever(index, encoder, LexicalIndex(index.passages), mode=mode)
    hits = retriever.search("tratamiento con osimertinib", k=5)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(-1.0 <= h.dense <= 1.0 for h in hits)


# --- the teacher's own queries, built from a simulation state ------------------------------


def _state(volume: float, **fields: object) -> SimulationState:
    return SimulationState.model_validate({"edad": 62, "volumen_tumor_sensible": volume, **fields})


@pytest.fixture(scope="module")
def library() -> CaseLibrary:
    return CaseLibrary.load()


@pytest.fixture(scope="module")
def teacher(retriever, library) -> TeacherService:
    """The real passage choice (no model needed): its queries go through the real retriever."""
    return TeacherService(
        library=library,
        search=retriever.search,
        index_id=retriever.index.index_id,
        cache=ResponseCache(0, 0),
        config=TeacherConfig(),
    )


def test_stage_ia_state_query_ranks_the_stage_i_passage_first(retriever):
    state = canonicalize(_state(1.0))  # < 3 cm³: "IA (T1a)"
    assert state.stage.startswith("IA ")
    stage_query = retrieval_queries(state, None)[0]
    hits = retriever.search(stage_query, k=4)
    assert hits[0].passage.id == "tnm-estadio-i-01", [h.passage.id for h in hits]
    assert hits[0].grounded


@pytest.mark.parametrize(
    ("volume", "case_id", "stage_passage"),
    [
        pytest.param(1.0, None, "tnm-estadio-i-01", id="IA"),
        pytest.param(5.0, None, "tnm-estadio-i-01", id="IB"),
        pytest.param(20.0, None, "tnm-estadio-ii-01", id="IIA"),
        pytest.param(100.0, None, "tnm-estadio-iii-01", id="IIIA+"),
        pytest.param(1.0, "SEER_001_estadio_IA", "tnm-estadio-i-01", id="case-IA"),
        pytest.param(1.0, "SEER_002_fumador_activo", "tnm-estadio-ii-01", id="case-IIB"),
        pytest.param(1.0, "SEER_006_comorbilidades", "tnm-estadio-iii-01", id="case-IIIB"),
        pytest.param(1.0, "SEER_005_joven_nunca_fumador", "tnm-estadio-iv-01", id="case-IVA"),
        # plain "IV": the stage passage says "tratar", the query "tratamiento" (a synonym now)
        pytest.param(1.0, "SEER_004_estadio_IV_metastasis", "tnm-estadio-iv-01", id="case-IV"),
        pytest.param(1.0, "SEER_007_recurrencia_post_cirugia", "tnm-estadio-iv-01", id="case-IV-relapse"),
    ],
)
def test_each_stage_state_is_taught_from_its_stage_passage(teacher, volume, case_id, stage_passage):
    case_fields = {"modo": "biblioteca", "caso_id": case_id} if case_id else {}
    state = canonicalize(_state(volume, **case_fields))
    chosen = [p.id for p in teacher.retrieve(state, teacher.library.get(state.case_id))]
    assert stage_passage in chosen, chosen


def test_a_100_year_old_is_in_the_top_age_band_not_in_the_nineties():
    assert canonicalize(_state(1.0, edad=100)).age_band == "90 o más"
    assert canonicalize(_state(1.0, edad=90)).age_band == "90 o más"
    assert canonicalize(_state(1.0, edad=89)).age_band == "80-89"
    assert canonicalize(_state(1.0, edad=18)).age_band == "10-19"


# --- words: stages and the spellings of one term ------------------------------------------


def test_stage_letters_are_words_and_a_substage_belongs_to_its_stage():
    assert tokenize("estadio I") == ["estadi", "i"]
    assert set(tokenize("estadio IA1")) >= {"ia1", "ia", "i"}
    assert set(tokenize("estadio IIIB")) >= {"iiib", "iii"}
    assert "iv" in tokenize("estadio IVA")
    assert "ii" not in tokenize("estadio IIIB")  # IIIB is stage III, not II


@pytest.mark.parametrize(
    ("spelling", "corpus_term"),
    [
        ("cáncer de células no pequeñas", "cáncer no microcítico"),
        ("cáncer de células pequeñas", "cáncer microcítico"),
        ("PDL1", "PD-L1"),
        ("PD L1", "PD-L1"),
        ("anti-PD1", "anti-PD-1"),
        ("CPCNP", "CPNM"),
        ("NSCLC", "CPNM"),
    ],
    ids=["celulas-no-pequenas", "celulas-pequenas", "PDL1", "PD L1", "PD1", "CPCNP", "NSCLC"],
)
def test_spellings_of_one_term_are_the_same_words(spelling, corpus_term):
    assert tokenize(spelling) == tokenize(corpus_term)


def test_pdl1_without_hyphen_finds_the_pd_l1_passage_grounded(retriever):
    hits = retriever.search("¿Qué es el PDL1?", k=3)
    assert hits[0].passage.id == "pdl1-que-es-01" and hits[0].grounded


@pytest.mark.parametrize(
    ("query", "topic"),
    [
        ("cáncer de pulmón de células pequeñas", "microcitico"),
        ("SCLC", "microcitico"),
        ("cáncer de pulmón de células no pequeñas", "cpnm"),
        ("NSCLC", "cpnm"),
    ],
    ids=["celulas-pequenas", "SCLC", "celulas-no-pequenas", "NSCLC"],
)
def test_small_cell_and_non_small_cell_questions_find_their_histology(retriever, query, topic):
    top = retriever.search(query, k=1)[0]
    assert top.grounded and topic in top.passage.temas, (top.passage.id, top.passage.temas)


def test_measure_speed_reports_percentiles(retriever):
    speed = measure_speed(retriever, ["Escala ECOG", "¿Qué es el cribado?"], rounds=1)
    assert set(speed["encode_ms"]) == {"p50", "p95"} and speed["search_ms"]["p50"] > 0


# --- index files ---------------------------------------------------------------------------


def test_index_carries_its_passages_and_manifest(index, passages, encoder_sha):
    assert [p.id for p in index.passages] == [p.id for p in passages]
    assert index.manifest["passage_count"] == len(passages)
    assert index.manifest["corpus_hash"] == corpus_hash(passages)
    assert index.manifest["encoder_sha256"] == encoder_sha
    assert len(index.index_id) == 12


@pytest.mark.parametrize("name", ["index.bin", "passages.jsonl", "manifest.json"])
def test_missing_index_file_asks_for_a_rebuild(index_copy, encoder, encoder_sha, name):
    (index_copy / name).unlink()
    with pytest.raises(KnowledgeIndexError) as excinfo:
        KnowledgeIndex.load(index_copy, encoder_sha256=encoder_sha, dim=encoder.dim)
    _assert_rebuild_error(excinfo)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("index.bin", lambda b: b[: len(b) // 2]),
        ("index.bin", lambda b: b[:100] + bytes(len(b) - 100)),
        ("passages.jsonl", lambda b: b"\n".join(b.splitlines()[:-1]) + b"\n"),
        ("passages.jsonl", lambda b: b"{not json\n" + b),
        ("manifest.json", lambda b: b"{ broken"),
        ("manifest.json", lambda b: b"[]"),
    ],
)
def test_corrupt_index_file_asks_for_a_rebuild(index_copy, encoder, encoder_sha, name, damage):
    path = index_copy / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(KnowledgeIndexError) as excinfo:
        KnowledgeIndex.load(index_copy, encoder_sha256=encoder_sha, dim=encoder.dim)
    _assert_rebuild_error(excinfo)


def test_index_built_with_another_encoder_is_refused(index_copy, encoder, encoder_sha):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["encoder_sha256"] = "0" * 64
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KnowledgeIndexError) as excinfo:
        KnowledgeIndex.load(index_copy, encoder_sha256=encoder_sha, dim=encoder.dim)
    _assert_rebuild_error(excinfo)
    with pytest.raises(KnowledgeIndexError):
        KnowledgeIndex.load(index_copy, encoder_sha256=encoder_sha, dim=encoder.dim + 1)


def test_rebuild_replaces_an_existing_index_atomically(index_copy, passages, encoder, encoder_sha):
    subset = passages[:12]
    KnowledgeIndex.build(subset, encoder, index_copy, encoder_sha256=encoder_sha, progress=False).close()
    reloaded = KnowledgeIndex.load(index_copy, encoder_sha256=encoder_sha, dim=encoder.dim)
    assert len(reloaded) == 12
    assert [p.id for p in reloaded.passages] == [p.id for p in subset]
    assert reloaded.search(encoder.encode_one(subset[3].texto), 1)[0][0] == 3
    # no temp or old dirs left (the build's lock file may stay: the OS lock on it is what counts)
    assert sorted(p.name for p in index_copy.parent.iterdir() if p.name != ".index.lock") == ["index"]


def test_stale_index_is_detected(built_dir, passages, encoder_sha, tmp_path):
    assert not index_is_stale(built_dir, passages, encoder_sha)
    assert index_is_stale(built_dir, passages[:-1], encoder_sha)
    assert index_is_stale(built_dir, passages, "f" * 64)
    assert index_is_stale(tmp_path / "nowhere", passages, encoder_sha)


# --- corpus --------------------------------------------------------------------------------


def test_corpus_loads_with_unique_ids_and_sources(passages):
    assert len(passages) >= 100
    assert len({p.id for p in passages}) == len(passages)
    assert all(p.fuente and p.texto for p in passages)


def test_corpus_hash_is_stable_and_content_sensitive(passages):
    assert corpus_hash(passages) == corpus_hash(list(passages))
    assert corpus_hash(passages) != corpus_hash(passages[1:])


def _record(pid: str) -> str:
    return json.dumps({"id": pid, "titulo": "T", "fuente": "F", "temas": ["x"], "texto": "texto"})


def test_bad_corpus_line_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(_record("a-1") + "\n" + '{"id": "a-2"}\n')
    with pytest.raises(CorpusError, match=r"a\.jsonl:2"):
        load_corpus(tmp_path)


def test_duplicate_passage_id_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text(_record("dup") + "\n")
    (tmp_path / "b.jsonl").write_text("\n" + _record("dup") + "\n")
    with pytest.raises(CorpusError, match=r"b\.jsonl:2.*dup"):
        load_corpus(tmp_path)


def test_lab_document_is_chunked_with_its_source(tmp_path):
    paragraphs = [" ".join(f"palabra{p}_{w}" for w in range(60)) for p in range(6)]
    text = "Fuente: Protocolo del hospital 2024\n\n# Guía de nódulos\n\n" + "\n\n".join(paragraphs)
    (tmp_path / "Guía Nódulos.md").write_text(text, encoding="utf-8")
    chunks = chunk_documents(tmp_path)
    assert len(chunks) >= 3
    assert [c.id for c in chunks] == [f"doc-guia-nodulos-{n}" for n in range(1, len(chunks) + 1)]
    assert {c.fuente for c in chunks} == {"Protocolo del hospital 2024"}
    assert {c.titulo for c in chunks} == {"Guía de nódulos"}
    assert all(len(c.texto.split()) <= CHUNK_WORDS for c in chunks)
    assert chunks[1].texto.split()[0] in chunks[0].texto.split()  # consecutive chunks overlap
    every_word = {w for p in paragraphs for w in p.split()}
    assert every_word == {w for c in chunks for w in c.texto.split()}


@pytest.mark.parametrize(
    "lengths", [[140, 150], [150, 150], [149, 2, 150], [100, 100, 100], [400], [10, 400, 10], [151]]
)
def test_no_lab_chunk_outgrows_the_chunk_size_with_its_overlap(lengths):
    paragraphs = [[f"p{p}w{w}" for w in range(n)] for p, n in enumerate(lengths)]
    chunks = _chunk_words(paragraphs)
    assert all(len(chunk) <= CHUNK_WORDS for chunk in chunks), [len(c) for c in chunks]
    assert [w for p in paragraphs for w in p] == list(dict.fromkeys(w for c in chunks for w in c))


def test_corpus_text_with_unicode_line_separators_stays_one_passage(tmp_path):
    texto = "Primera línea\u2028segunda\u2029tercera\u0085cuarta."
    record = {"id": "sep-1", "titulo": "T", "fuente": "F", "temas": ["x"], "texto": texto}
    (tmp_path / "a.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (passage,) = load_corpus(tmp_path)
    assert passage.texto == texto


def test_corpus_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + _record("bom-1").encode("utf-8") + b"\r\n")
    assert [p.id for p in load_corpus(tmp_path)] == ["bom-1"]


def test_corpus_file_saved_as_windows_1252_is_refused_asking_for_utf8(tmp_path):
    record = {"id": "ansi-1", "titulo": "Pulmón", "fuente": "F", "temas": ["x"], "texto": "Cáncer."}
    (tmp_path / "ansi.jsonl").write_bytes((json.dumps(record, ensure_ascii=False) + "\n").encode("cp1252"))
    with pytest.raises(CorpusError) as excinfo:
        load_corpus(tmp_path)
    assert "ansi.jsonl" in excinfo.value.message and "UTF-8" in excinfo.value.fix


def test_lab_document_without_source_line_is_refused(tmp_path):
    (tmp_path / "notas.txt").write_text("Unas notas sin origen.\n\nOtro párrafo.\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"notas\.txt"):
        chunk_documents(tmp_path)


def test_a_critical_patient_is_taught_palliative_care_right_after_the_stage(teacher):
    state = canonicalize(_state(400.0, lung_state="terminal", edad=78))
    chosen = teacher.retrieve(state, None)
    assert "paliativ" in chosen[1].texto.lower(), [p.id for p in chosen]


@pytest.mark.parametrize("treatment", ["quimio", "radio", "inmuno"])
def test_a_tumour_growing_under_treatment_is_taught_what_comes_next(teacher, treatment):
    """A patient progressing on chemotherapy was offered surgery: the stage passage led and no
    passage said what follows a failed treatment. Now the second passage does, and the resistant
    clones (why it grows) come before the treatment's side effects."""
    state = canonicalize(
        _state(90.0, volumen_tumor_resistente=30.0, tratamiento_activo=treatment, lung_state="progresando")
    )
    chosen = teacher.retrieve(state, None)
    ids = [p.id for p in chosen]
    assert ids[1] == "progresion-segunda-linea-01", ids
    assert "resistente" in chosen[2].texto, ids
    # under treatment but stable: no progression passage
    stable = canonicalize(_state(90.0, tratamiento_activo=treatment, lung_state="estable"))
    assert not any(p.id.startswith("progresion-") for p in teacher.retrieve(stable, None))


@pytest.mark.parametrize("treatment", ["quimio", "radio", "inmuno"])
@pytest.mark.parametrize("lung_state", ["estable", None])
def test_a_patient_on_treatment_whose_tumour_does_not_grow_is_taught_what_comes_next_at_their_stage(
    teacher, library, treatment, lung_state
):
    """A stage II patient 100 days into chemotherapy was recommended surgery then adjuvant
    chemotherapy: no passage said what to do while a treatment works. Right after the stage now:
    in stage I-II completing the curative plan (CT follow-up after radiotherapy), in stage IV
    keeping the treatment and assessing the response; stage III's own passage names what follows.
    In stage IA chemotherapy and immunotherapy are not its treatment: there, why not (LACE)."""
    expected = {
        "IA": "segui-rt-01" if treatment == "radio" else "adyu-quimio-02",
        "I": "segui-rt-01" if treatment == "radio" else "tratamiento-curativo-estadios-i-ii-01",
        "III": None,
        # on radiotherapy: what radiotherapy is for in stage IV (symptoms), not cycles to assess
        "IV": "meta-tratamiento-local-01" if treatment == "radio" else "respuesta-evaluacion-recist-01",
    }
    on_treatment = {"tratamiento_activo": treatment, "dias_tratamiento": 100, "lung_state": lung_state}
    for volume, group in ((1.0, "IA"), (20.0, "I"), (90.0, "III")):
        ids = [p.id for p in teacher.retrieve(canonicalize(_state(volume, **on_treatment)), None)]
        if expected[group] is None:
            assert not {*expected.values()} & {*ids}, ids
        else:
            assert ids[1] == expected[group], ids
        assert not any(i.startswith("progresion-") for i in ids), ids
        # a current smoker's quitting passage keeps its place among the three
        smoker = canonicalize(_state(volume, es_fumador=True, pack_years=40, **on_treatment))
        chosen = teacher.retrieve(smoker, None)
        assert any("dejar de fumar" in p.texto.lower() for p in chosen), [p.id for p in chosen]
    # stage IV: a library case's own stage
    seer_004 = library.get("SEER_004_estadio_IV_metastasis")
    state = canonicalize(SimulationState.model_validate(case_request(seer_004) | on_treatment))
    assert expected["IV"] in [p.id for p in teacher.retrieve(state, seer_004)]
    # without treatment, or progressing on it, none of them
    for other in (_state(20.0), _state(20.0, tratamiento_activo=treatment, lung_state="progresando")):
        ids = [p.id for p in teacher.retrieve(canonicalize(other), None)]
        assert not {*expected.values()} & {*ids}, ids


def test_an_ex_smoker_with_a_tumour_is_not_taught_screening(teacher):
    state = canonicalize(_state(100.0, es_fumador=False, pack_years=45, dias_desde_cambio=200))
    texts = [p.texto.lower() for p in teacher.retrieve(state, None)]
    assert not any("nlst" in t or "cribado" in t.split(".")[0] for t in texts), texts
    assert any("dejar de fumar" in t or "sin fumar" in t for t in texts), texts
    # nor told to quit: the passage opening «Dejar de fumar después del diagnóstico… sigue siendo
    # importante» became «debe dejar de fumar» for a patient who quit years ago
    assert not any("después del diagnóstico" in t.split(".")[0] for t in texts), texts


def test_a_smoker_with_a_tumour_is_taught_that_quitting_now_still_matters(teacher):
    """Not the prevention passage («reduce el riesgo de cáncer de pulmón»): they have one."""
    state = canonicalize(_state(100.0, es_fumador=True, pack_years=45))
    ids = [p.id for p in teacher.retrieve(state, None)]
    assert "tab-dejar-fumar-02" in ids and "tab-dejar-fumar-01" not in ids, ids


@pytest.mark.parametrize(
    ("resistant", "treatment", "expected"),
    [(0.2, None, False), (0.2, "quimio", True), (3.0, None, True), (0.0, "quimio", False)],
)
def test_the_resistance_passage_comes_when_resistance_matters(teacher, resistant, treatment, expected):
    fields = {"volumen_tumor_resistente": resistant}
    if treatment:
        fields |= {"tratamiento_activo": treatment, "dias_tratamiento": 20}
    state = canonicalize(_state(20.0, **fields))
    assert (RESISTANCE_QUERY in retrieval_queries(state, None)) is expected
