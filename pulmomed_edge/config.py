"""Settings for one PulmoMed Edge process, and where its files live.

Every knob has a default, a `PULMOMED_*` environment variable and (for `serve`) a flag. Paths follow
one rule so the same code runs from a checkout and from a read-only bundle: a checkout keeps models
and the index beside the code (`models/`, `index/`); anything else (the bundle) uses the
platformdirs user data dir. Logs always go to the platformdirs user log dir.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import SettingsError

APP_NAME = "pulmomed-edge"
APP_AUTHOR = "PulmoMed"

PACKAGE_DIR = Path(__file__).resolve().parent
KNOWLEDGE_DIR = PACKAGE_DIR / "knowledge"
CORPUS_DIR = KNOWLEDGE_DIR / "corpus"
CASES_FILE = KNOWLEDGE_DIR / "cases.json"


def repo_root() -> Path | None:
    """The source checkout this package runs from, or None (installed wheel, frozen bundle)."""
    if getattr(sys, "frozen", False):
        return None
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "models").is_dir() else None


def _user_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, APP_AUTHOR))


def _user_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir(APP_NAME, APP_AUTHOR))


def default_models_dir() -> Path:
    root = repo_root()
    return root / "models" if root else _user_data_dir() / "models"


def default_index_dir() -> Path:
    root = repo_root()
    return root / "index" / "current" if root else _user_data_dir() / "index" / "current"


def manifest_path() -> Path:
    """The manifest of pinned model files: package data, so a checkout, an installed wheel and
    the bundle read the same file (it was models/manifest.json, which nothing installed)."""
    return PACKAGE_DIR / "data" / "models-manifest.json"


MAX_PARKED_PREFIXES = 64  # llama.cpp allows 256 sequences in all; each parked prompt is one
MAX_SLOTS = 64  # with the parked prompts, well inside llama.cpp's 256 sequences

# the numbers a setting may take (a value outside fails at start-up, naming its variable)
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("port", 0, 65535),  # 0: the system picks one (tests); `serve` wants a port headsets can be told
    ("threads", 0, 1024),
    ("slots", 1, MAX_SLOTS),
    ("parked_prefixes", 0, MAX_PARKED_PREFIXES),
    ("prefill_chunk", 1, 4096),
    ("n_ctx", 0, math.inf),
    ("max_prompt_tokens", 128, math.inf),
    ("max_new_tokens", 1, math.inf),
    ("budget_s", 1, math.inf),
    ("queue_size", 0, math.inf),
    ("temperature", 0, 2),
    ("top_k_passages", 1, 20),
    ("cache_size", 0, math.inf),
    ("cache_ttl_s", 0, math.inf),
    ("rate_limit_per_min", 0, math.inf),
    ("max_body_bytes", 1024, math.inf),
)


@dataclass(frozen=True)
class Settings:
    """Everything one server process needs to know; built once by the CLI, passed down."""

    host: str = "0.0.0.0"
    port: int = 8000
    model: str = ""  # model store name; "" = the manifest's default (or test) LLM
    test_models: bool = False
    threads: int = 0  # 0 = all physical cores we can see
    slots: int = 8
    # finished prompts whose cache cells are kept for later students (engine/scheduler.py)
    parked_prefixes: int = 8
    prefill_chunk: int = 32  # prompt tokens evaluated per step (engine/batching.py)
    n_ctx: int = 0  # 0 = sized from slots × (max prompt + answer)
    # the KV cache: "unified" (one cache all answers share: a prefix is shared without a copy;
    # where llama.cpp puts a cell can change a greedy answer's rounding) or "streams" (one per
    # answer and per parked prompt: prefixes are copied, and an answer is the same alone or in a
    # batch, but bursts ran 3-7 % slower here); engine/runtime.py, BENCHMARKS.md twelfth round
    kv_layout: str = "unified"
    max_prompt_tokens: int = 768
    max_new_tokens: int = 160
    budget_s: float = 15.0
    queue_size: int = 32
    temperature: float = 0.3
    seed: int = 7
    top_k_passages: int = 3
    cache_size: int = 256
    cache_ttl_s: float = 300.0
    rate_limit_per_min: int = 10
    backfill: bool = True  # answer busy spells' fallback states later, while the engine is idle
    # withhold answer sentences the sources do not support (grounding.py): "auto" = on for the
    # pinned models it was tuned on, off for a model the lab added; or "1" / "0"
    grounding: str = "auto"
    # who writes the recommendation: "model", or "sources" (the model writes the explanation, the
    # recommendation is the retrieved guideline's own sentence); "auto" = sources for the pinned
    # small models (read in real answers, not one of their own recommendations was a correct next
    # step), model for a model the lab added (the 3B)
    recommendation: str = "auto"
    # with the check on, stream whole checked sentences (never one the answer then takes back);
    # off: pieces of words as they come, sooner, and `done` drops what the check withheld
    stream_sentences: bool = True
    max_body_bytes: int = 64 * 1024
    models_dir: Path = field(default_factory=default_models_dir)
    index_dir: Path = field(default_factory=default_index_dir)
    log_dir: Path = field(default_factory=_user_log_dir)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then PULMOMED_* variables, then explicit overrides (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"PULMOMED_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.type, raw, f.name)
        flagged = {k: v for k, v in overrides.items() if v is not None}
        if flagged.get("test_models") and "model" not in flagged:
            values.pop("model", None)  # --test-models means the test models, whatever the environment says
        values.update(flagged)
        try:
            return replace(cls(), **values)
        except SettingsError as exc:
            if exc.name not in flagged:
                raise
            # the flag's value was refused: name the flag, not a variable nobody set
            raise SettingsError(exc.name, exc.raw, exc.expected, exc.esperado, flag=_flag(exc.name)) from None

    def __post_init__(self) -> None:
        if _switch(self.grounding) is None and self.grounding.strip().lower() != "auto":
            raise SettingsError("grounding", self.grounding, "use auto, 1 or 0", "usa auto, 1 o 0")
        if self.kv_layout not in ("streams", "unified"):
            raise SettingsError(
                "kv_layout", self.kv_layout, "use streams or unified", "usa streams o unified"
            )
        if self.recommendation.strip().lower() not in ("auto", "model", "sources"):
            raise SettingsError(
                "recommendation",
                self.recommendation,
                "use auto, model or sources",
                "usa auto, model o sources",
            )
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if not low <= value <= high:
                if high == math.inf:
                    raise SettingsError(name, value, f"use {low} or more", f"usa {low} o más")
                raise SettingsError(name, value, f"use {low} to {high}", f"usa de {low} a {high}")

    def grounding_on(self, *, model_added: bool) -> bool:
        """Whether to check answers against their sources with this model (see `grounding`)."""
        switch = _switch(self.grounding)
        return (not model_added) if switch is None else switch

    def recommendation_from_sources(self, *, model_added: bool) -> bool:
        """Whether the recommendation is the sources' own sentence with this model (see
        `recommendation`)."""
        choice = self.recommendation.strip().lower()
        return (not model_added) if choice == "auto" else choice == "sources"

    @property
    def log_file(self) -> Path:
        """Where `serve` logs (rotated); what a fault's fix points the teacher to."""
        return self.log_dir / "pulmomed-edge.log"

    @property
    def effective_threads(self) -> int:
        return self.threads if self.threads > 0 else max(1, os.cpu_count() or 1)

    @property
    def context_per_answer(self) -> int:
        """Cells one answer may use: its prompt, its new tokens and a margin."""
        return self.max_prompt_tokens + self.max_new_tokens + 40

    @property
    def effective_n_ctx(self) -> int:
        if self.n_ctx > 0:
            return self.n_ctx
        if self.kv_layout == "streams":
            # a stream per slot and per parked prompt, each as large as one answer may grow
            return (self.slots + self.parked_prefixes) * self.context_per_answer
        # one shared system prefix + every slot's own prompt and answer + the parked prompts
        slots = self.slots * (self.max_prompt_tokens + self.max_new_tokens)
        return self.max_prompt_tokens + slots + self.parked_prefixes * self.max_prompt_tokens


# read outside Settings (engine/runtime.py: llama.cpp's own log lines, for debugging)
_OTHER_VARIABLES = frozenset({"PULMOMED_LLAMA_LOG"})


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """PULMOMED_* variables that no setting reads: most likely a typo (PULMOMED_SLOT=4), which
    would otherwise be ignored without a word."""
    env = os.environ if environ is None else environ
    known = {f"PULMOMED_{f.name.upper()}" for f in fields(Settings)} | _OTHER_VARIABLES
    return sorted(name for name in env if name.startswith("PULMOMED_") and name not in known)


def _flag(name: str) -> str:
    """The command-line flag that sets a setting (`serve --budget` sets budget_s)."""
    return "--budget" if name == "budget_s" else "--" + name.replace("_", "-")


_TRUE = {"1", "true", "yes", "si", "sí", "on"}
_FALSE = {"0", "false", "no", "off"}


def _switch(raw: str) -> bool | None:
    """An on/off setting's value, or None when it is neither (e.g. "auto")."""
    value = raw.strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def _coerce(type_name: object, raw: str, name: str) -> object:
    kind = str(type_name)
    if kind == "bool":
        if (switch := _switch(raw)) is None:
            raise SettingsError(name, raw, "use 1 or 0", "usa 1 o 0")
        return switch
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
    except ValueError:
        words = ("a whole number", "un número entero") if kind == "int" else ("a number", "un número")
        raise SettingsError(name, raw, f"use {words[0]}", f"usa {words[1]}") from None
    if kind == "Path":
        return Path(raw).expanduser()
    return raw
