"""`pulmomed-edge`: a thin command line over the library (serve, models, index, search, eval, bench)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import sys
from pathlib import Path

from .config import CORPUS_DIR, Settings, manifest_path, unknown_variables
from .errors import PulmoMedError, SettingsError

log = logging.getLogger("pulmomed_edge")


def main(argv: list[str] | None = None) -> int:
    _tolerant_output()
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    for name in unknown_variables():
        _warn(
            f"{name} is not a PulmoMed Edge setting (a typo?): ignored", f"{name} no es un ajuste: se ignora"
        )
    try:
        return int(args.func(args) or 0)
    except PulmoMedError as exc:
        print(f"error: {_explain(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _tolerant_output() -> None:
    """Output redirected to a file on Windows is written in the ANSI code page (cp1252), which has
    no '≈' or '→' (passages and lab documents may): such a character is replaced, instead of a
    UnicodeEncodeError stopping the command."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _explain(exc: PulmoMedError) -> str:
    """A fault for the admin: English, Spanish, and the fix when there is one."""
    if exc.solucion:
        fix = f"\n  solución: {exc.solucion}\n  fix: {exc.fix}"
    else:
        fix = f"\n  fix / solución: {exc.fix}" if exc.fix else ""
    return f"{exc.message}\n  {exc.mensaje}{fix}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pulmomed-edge", description="PulmoMed Edge: the offline AI teacher.")
    sub = p.add_subparsers()

    serve = sub.add_parser("serve", help="serve the headset API on the classroom LAN")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="model store name (see `models list`)")
    serve.add_argument("--threads", type=int)
    serve.add_argument("--slots", type=int, help="answers generated at once")
    serve.add_argument("--budget", type=float, dest="budget_s", help="seconds before the fallback answer")
    serve.add_argument("--test-models", action="store_true", default=None, help="use the small test models")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="fetch, verify and register model files").add_subparsers()
    fetch = models.add_parser("fetch", help="download and verify the pinned models")
    fetch.add_argument("--test", action="store_true", help="the small test set")
    fetch.set_defaults(func=_models_fetch)
    verify = models.add_parser("verify", help="re-hash model files against the manifest")
    verify.add_argument("names", nargs="*")
    verify.add_argument("--test", action="store_true")
    verify.set_defaults(func=_models_verify)
    add = models.add_parser("add", help="register a GGUF copied onto this machine")
    add.add_argument("path", type=Path)
    add.add_argument("--name", required=True)
    add.set_defaults(func=_models_add)
    models.add_parser("list", help="list known models").set_defaults(func=_models_list)

    index = sub.add_parser("index", help="build the knowledge index").add_subparsers()
    build = index.add_parser("build", help="embed the corpus (and lab documents) into the index")
    corpus = build.add_mutually_exclusive_group()
    corpus.add_argument(
        "--corpus",
        type=Path,
        help="a folder of *.jsonl passages instead of the shipped corpus; "
        "recorded in the index and used again by a build without --corpus",
    )
    corpus.add_argument(
        "--shipped-corpus", action="store_true", help="build from the shipped corpus, not the one recorded"
    )
    lab = build.add_mutually_exclusive_group()
    lab.add_argument(
        "--add",
        type=Path,
        action="append",
        default=[],
        help="a folder of the lab's .md/.txt documents (repeat for more); "
        "recorded in the index and used again by a build without --add",
    )
    lab.add_argument(
        "--no-lab-docs", action="store_true", help="build without the lab folders recorded in the index"
    )
    build.add_argument("--if-stale", action="store_true", help="only when missing, damaged or out of date")
    build.set_defaults(func=_index_build)

    search = sub.add_parser("search", help="search the knowledge base as the teacher does")
    search.add_argument("query")
    search.add_argument("-k", type=_positive, default=5, help="how many passages (1 or more)")
    search.set_defaults(func=_search)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers()
    er = ev.add_parser("retrieval", help="hit@1/3/5 and MRR over a JSONL query file")
    er.add_argument("file", type=Path)
    er.set_defaults(func=_eval_retrieval)
    eg = ev.add_parser(
        "grounding",
        help="which sentences the grounding check withholds, each against the corpus passages named",
    )
    eg.add_argument("file", type=Path, help='JSONL: {"passages": [ids], "sentence": "…", "expected": "kept"}')
    eg.set_defaults(func=_eval_grounding)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return p


# --- serve ---------------------------------------------------------------------------------
def setup_logging(settings: Settings) -> Path | None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    root.addHandler(err)
    from .http.middlewares import MalformedHttpFilter

    logging.getLogger("aiohttp.server").addFilter(MalformedHttpFilter())
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        path = settings.log_file
        fh = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
        return path
    except OSError as exc:
        log.warning("cannot write logs to %s: %s", settings.log_dir, exc)
        return None


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .app import create_app
    from .http.status_page import LOOPBACK_WARNING, NO_NETWORK
    from .network import is_loopback_host, is_wildcard_host, teacher_urls

    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        model=args.model,
        threads=args.threads,
        slots=args.slots,
        budget_s=args.budget_s,
        test_models=args.test_models,
    )
    if settings.port == 0:  # the headsets must be told a port, and the banner would say ":0"
        flag = "--port" if args.port is not None else ""
        raise SettingsError("port", 0, "use 1 to 65535 to serve", "usa de 1 a 65535 para servir", flag=flag)
    log_path = setup_logging(settings)
    app = create_app(settings)
    urls = teacher_urls(settings.host, settings.port)
    # the teacher opens the status page on this laptop; headsets need a LAN address
    local = f"http://127.0.0.1:{settings.port}" if is_wildcard_host(settings.host) else urls[0]
    if is_loopback_host(settings.host):
        headsets = [f"    {LOOPBACK_WARNING}"]
    else:
        headsets = [f"    {u}" for u in urls] or [f"    {NO_NETWORK}"]
    banner = [
        "PulmoMed Edge — profesor virtual / AI teacher",
        "Direcciones para los visores / headset addresses:",
        *headsets,
        f"Estado / status page: {local}/",
        f"Registro / log: {log_path or 'no disponible / unavailable (see the warning above)'}",
        "Ctrl+C para detener / to stop.",
    ]

    async def say_stopping(_app: web.Application) -> None:
        # answers still writing end with their summary first: the wait must not look like a hang
        print("Deteniendo PulmoMed Edge… / stopping…", file=sys.stderr, flush=True)

    app.on_shutdown.insert(0, say_stopping)
    try:
        # the banner once the port is ours (run_app calls `print` then), never for a server that
        # could not start; a headset that disconnects cancels its handler at once, so its
        # answer's slot is freed within a step (aiohttp's default runs it until it next writes)
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            print=lambda _started: print("\n".join(banner), file=sys.stderr, flush=True),
            access_log=None,
            handler_cancellation=True,
        )
    except OSError as exc:  # the port is taken (another PulmoMed Edge?) or the address is not ours
        raise PulmoMedError(
            f"No se puede escuchar en {settings.host}:{settings.port}: {_why_not_listening(exc)}.",
            f"Cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}.",
            "close the other program using that port (another PulmoMed Edge?), or start on another "
            "port: PULMOMED_PORT=8001 (or --port 8001) — and point the headsets at it",
            "cierra el otro programa que usa ese puerto (¿otro PulmoMed Edge ya abierto?), o arranca "
            "en otro puerto: PULMOMED_PORT=8001 (o --port 8001), y apunta los visores a él",
        ) from None
    return 0


def _why_not_listening(exc: OSError) -> str:
    """The bind error in Spanish for the teacher (the OS says it in English, or in the OS's language)."""
    reasons = {
        errno.EADDRINUSE: "otro programa ya usa ese puerto",
        errno.EADDRNOTAVAIL: "esa dirección no es de este equipo",
        errno.EACCES: "el sistema no permite usar ese puerto",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


# --- models --------------------------------------------------------------------------------
def _store(settings: Settings | None = None):
    from .model_store import ModelStore

    settings = settings or Settings.from_env()
    return ModelStore(settings.models_dir, manifest_path())


def _models_fetch(args: argparse.Namespace) -> int:
    store = _store()
    names = store.set_names("test" if args.test else "default")
    for path in store.fetch(names):
        print(f"ok  {path}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    """Re-hash the named models, or the set's and every lab-added one; report each, then fail if
    any did."""
    store = _store()
    names = args.names or [
        *store.set_names("test" if args.test else "default"),
        *(e.name for e in store.entries() if e.is_local),
    ]
    failed = 0
    for name in names:
        try:
            print(f"ok  {name}  {store.verify(name, full=True, progress=True)}")
        except PulmoMedError as exc:
            failed += 1
            print(f"FAILED  {name}: {_explain(exc)}")
    return 1 if failed else 0


def _models_add(args: argparse.Namespace) -> int:
    entry = _store().add(args.path, args.name)
    print(f"registered {entry.name} sha256={entry.sha256}")
    print(f"  serve with: pulmomed-edge serve --model {entry.name}")
    print(RESTART_TO_USE)
    return 0


# a running server keeps what it loaded at start-up (index, models)
RESTART_TO_USE = (
    "  si PulmoMed Edge está abierto, reinícielo para usarlo / "
    "if PulmoMed Edge is running, restart it to use this"
)


def _models_list(args: argparse.Namespace) -> int:
    store = _store()
    for e in store.entries():
        present = store.path_for(e.name).exists()
        print(f"{e.name:40s} {e.role:11s} {'present' if present else 'missing'}  {e.sha256[:12]}")
    return 0


# --- index, search, eval -------------------------------------------------------------------
def _encoder(settings: Settings):
    from .retrieval import open_encoder

    return open_encoder(_store(settings), threads=settings.effective_threads)


def _index_build(args: argparse.Namespace) -> int:
    from .corpus import load_corpus, read_lab_folders
    from .errors import CorpusError
    from .index import KnowledgeIndex, damage, stale_reason

    settings = Settings.from_env()
    try:
        corpus_dir, corpus = _corpus_to_index(args, settings.index_dir)
        folders, dropped = _lab_folders_to_index(args, settings.index_dir)
    except CorpusError as exc:
        # before class (`make run`), a lab folder (or corpus) on a stick that is not plugged in
        # must not stop the teacher: the current index still holds its documents
        if not args.if_stale or damage(settings.index_dir) is not None:
            raise
        _warn(
            f"{exc.message}; keeping the current index, which still holds its documents",
            f"{exc.mensaje}; se mantiene el índice actual, que aún los contiene",
        )
        return 0
    passages = load_corpus(corpus_dir)
    labs = read_lab_folders(folders, taken_ids={p.id for p in passages})
    _report_lab_folders(labs)
    if dropped:
        print(f"lab documents: no longer in the index: {', '.join(map(str, dropped))}")
    lab_documents = [str(lab.path) for lab in labs]
    passages += [p for lab in labs for p in lab.passages]
    encoder, sha = _encoder(settings)
    try:
        if args.if_stale:
            reason = stale_reason(
                settings.index_dir, passages, sha, lab_documents, encoder_settings=encoder.settings
            )
            if reason is None:
                print(f"index up to date: {settings.index_dir}")
                return 0
            print(f"rebuilding the index ({reason})")
        index = KnowledgeIndex.build(
            passages,
            encoder,
            settings.index_dir,
            encoder_sha256=sha,
            lab_documents=lab_documents,
            corpus=corpus,
        )
        print(f"built {settings.index_dir}: {len(index)} passages, id {index.index_id}")
        print(RESTART_TO_USE)
        index.close()
    finally:
        encoder.close()
    return 0


def _corpus_to_index(args: argparse.Namespace, index_dir: Path) -> tuple[Path, str | None]:
    """(the corpus folder to build from, what the index records of it: None for the shipped one):
    --corpus's, --shipped-corpus', or else the one the current index recorded, so a build without
    --corpus (`make run`) does not silently go back to the shipped passages."""
    from .errors import CorpusError, KnowledgeIndexError
    from .index import recorded_corpus

    def recorded_as(folder: Path) -> str | None:
        folder = folder.expanduser().resolve()
        return None if folder == CORPUS_DIR.resolve() else str(folder)

    if args.corpus is not None:
        return args.corpus, recorded_as(args.corpus)
    if args.shipped_corpus:
        return CORPUS_DIR, None
    try:
        recorded = recorded_corpus(index_dir)
    except KnowledgeIndexError as exc:
        _warn(
            f"{exc.message}: the corpus it was built from is unknown; building from the shipped "
            "corpus (give another with --corpus)",
            f"{exc.mensaje}: no se sabe de qué corpus se construyó; se usa el corpus incluido "
            "(indique otro con --corpus)",
        )
        return CORPUS_DIR, None
    if recorded is None:
        return CORPUS_DIR, None
    print(
        f"corpus: reusing the corpus recorded in the index, {recorded} "
        "(--corpus DIR to choose another, --shipped-corpus for the shipped one)"
    )
    if not Path(recorded).is_dir():
        raise CorpusError(
            f"La carpeta del corpus registrada en el índice ya no existe: {recorded}",
            f"the corpus folder recorded in the index no longer exists: {recorded}",
            "give the corpus again (pulmomed-edge index build --corpus DIR), "
            "or build from the shipped one: pulmomed-edge index build --shipped-corpus",
        )
    return Path(recorded), recorded


def _lab_folders_to_index(args: argparse.Namespace, index_dir: Path) -> tuple[list[Path], list[Path]]:
    """(folders to index, recorded folders left out): --add's folders, --no-lab-docs' none, or else
    the folders the current index recorded, so a build without --add (`make run`) keeps them."""
    from .errors import CorpusError, KnowledgeIndexError
    from .index import recorded_lab_documents

    try:
        recorded = [Path(folder) for folder in recorded_lab_documents(index_dir)]
    except KnowledgeIndexError as exc:
        _warn(
            f"{exc.message}: the lab folders it recorded, if any, are unknown; give them again with --add",
            f"{exc.mensaje}: no se sabe qué carpetas del laboratorio tenía; vuelva a darlas con --add",
        )
        recorded = []
    if args.no_lab_docs:
        return [], recorded
    if args.add:
        chosen = {folder.expanduser().resolve() for folder in args.add}
        return list(args.add), [folder for folder in recorded if folder not in chosen]
    if not recorded:
        return [], []
    print(
        "lab documents: reusing the folders recorded in the index "
        "(--add DIR to choose others, --no-lab-docs to build without them)"
    )
    missing = [folder for folder in recorded if not folder.is_dir()]
    if missing:
        names = ", ".join(map(str, missing))
        raise CorpusError(
            f"La carpeta de documentos del laboratorio registrada en el índice ya no existe: {names}",
            f"the lab documents folder recorded in the index no longer exists: {names}",
            "give the lab folders again (pulmomed-edge index build --add DIR), "
            "or build without them: pulmomed-edge index build --no-lab-docs",
        )
    return recorded, []


def _report_lab_folders(labs) -> None:
    """How many documents and passages each folder gave, and what was read or left out unexpectedly."""
    for lab in labs:
        print(f"lab documents: {lab.path}: {len(lab.documents)} documents, {len(lab.passages)} passages")
        for doc in lab.documents:
            if doc.encoding != "utf-8":
                print(f"  {doc.path.name}: not UTF-8, read as {_ENCODING_NAMES[doc.encoding]}")
            if doc.renamed:
                print(f"  {doc.path.name}: ids doc-{doc.slug}-N (its name's ids were taken)")
        skipped = f" (skipped: {', '.join(lab.skipped)})" if lab.skipped else ""
        omitidos = f" (omitidos: {', '.join(lab.skipped)})" if lab.skipped else ""
        if not lab.passages:
            _warn(
                f"{lab.path}: no .md/.txt documents with text in this folder{skipped}; nothing added",
                f"{lab.path}: ningún documento .md/.txt con texto{omitidos}; no se añade nada",
            )
        elif lab.skipped:
            print(f"  not read (only .md/.txt files directly in the folder are): {', '.join(lab.skipped)}")


_ENCODING_NAMES = {"cp1252": "Windows-1252 (Latin-1)", "utf-16": "UTF-16"}


def _warn(message: str, mensaje: str) -> None:
    print(f"warning: {message}\n  aviso: {mensaje}", file=sys.stderr)


def _open_retriever(settings: Settings):
    from .retrieval import open_retriever

    return open_retriever(settings.index_dir, *_encoder(settings))


def _search(args: argparse.Namespace) -> int:
    retriever = _open_retriever(Settings.from_env())
    for rank, hit in enumerate(retriever.search(args.query, args.k), 1):
        mark = "" if hit.grounded else "  (no fundamentado)"
        print(f"{rank}. [{hit.score:.4f}] {hit.passage.titulo} — {hit.passage.fuente}{mark}")
        print(f"   {hit.passage.id}: {hit.passage.texto[:160]}…")
    return 0


def _eval_grounding(args: argparse.Namespace) -> int:
    from .config import CORPUS_DIR
    from .corpus import load_corpus
    from .grounding import evaluate

    result = evaluate({p.id: p.texto for p in load_corpus(CORPUS_DIR)}, args.file)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def _eval_retrieval(args: argparse.Namespace) -> int:
    from .retrieval import evaluate

    retriever = _open_retriever(Settings.from_env())
    result = evaluate(retriever, args.file)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0
