"""`pulmomed-edge bench`'s flags, checked before anything starts: a value or combination the run
would fail on, or silently ignore, is refused at once (exit 2, like argparse's own errors)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
from pathlib import Path
from urllib.parse import urlparse

MIX_KINDS = ("libre", "biblioteca")
# what a spawned server gets unless told otherwise (with --url the server's own settings apply)
DEFAULT_SLOTS = 8
DEFAULT_MAX_TOKENS = 128


class BenchUsageError(Exception):
    """A flag value or combination the run cannot go ahead with (exit 2, like argparse's errors)."""


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail or be silently ignored later, then fill in the spawn defaults."""
    for flag, value in (
        ("--headsets", args.headsets),
        ("--requests", args.requests),
        ("--runs", args.runs),
        ("--slots", args.slots),
        ("--max-tokens", args.max_tokens),
    ):
        if value is not None and value < 1:
            raise BenchUsageError(f"{flag} must be at least 1, not {value}")
    for flag, value in (
        ("--duration", args.duration),
        ("--think", args.think),
        ("--repeat-after", args.repeat_after),
        ("--budget", args.budget),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BenchUsageError(f"{flag} must be 0 or more seconds, not {value:g}")
    parse_mix(args.mix)
    if args.repeat_after and args.duration:
        raise BenchUsageError("--repeat-after does not go with --duration (a timed run asks until it ends)")
    if args.url:
        _check_url_flags(args)
    args.slots = DEFAULT_SLOTS if args.slots is None else args.slots
    args.max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    args.budget = args.budget or 0.0
    for flag, path in (("--json", args.json), ("--save-answers", args.save_answers)):
        if path is not None:
            _check_writable(flag, path)


def _check_url_flags(args: argparse.Namespace) -> None:
    if args.spawn:
        raise BenchUsageError("--url and --spawn: choose one (measure a running server, or start one)")
    if args.runs > 1:
        raise BenchUsageError("--runs needs a server of bench's own (leave out --url)")
    ignored = [
        flag for flag, value in (("--slots", args.slots), ("--budget", args.budget)) if value is not None
    ]
    if args.max_tokens is not None and not (args.baseline or args.ceiling):
        ignored.append("--max-tokens")
    if ignored:
        raise BenchUsageError(
            f"{'/'.join(ignored)} would be ignored: with --url the server's own settings apply "
            "(--baseline/--ceiling use --max-tokens)"
        )
    args.url = check_url(args.url)


def check_url(url: str) -> str:
    """The base URL of a server on this machine (IPv4 or IPv6 loopback), without a trailing /."""
    parts = urlparse(url)
    try:
        well_formed = parts.scheme == "http" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        well_formed = False
    if not well_formed:
        raise BenchUsageError(f"--url takes http://HOST:PORT (e.g. http://127.0.0.1:8000), not {url!r}")
    try:
        found = {info[4][0] for info in socket.getaddrinfo(parts.hostname, None)}
        loopback = bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)
    except (OSError, ValueError):
        loopback = False
    if not loopback:
        raise BenchUsageError(
            f"bench only targets loopback addresses (127.0.0.1, ::1), not {parts.hostname!r}"
        )
    return url.rstrip("/")


def parse_mix(mix: str) -> dict[str, float]:
    """--mix as {kind: weight}: known kinds, weights of 0 or more, not all 0."""
    weights: dict[str, float] = {}
    for part in mix.split(","):
        kind, sep, raw = part.strip().partition(":")
        if not sep or kind not in MIX_KINDS:
            raise BenchUsageError(
                f"--mix takes kind:weight pairs, kinds {' and '.join(MIX_KINDS)} "
                f"(e.g. libre:0.7,biblioteca:0.3), not {part!r}"
            )
        try:
            weights[kind] = float(raw)
        except ValueError:
            weights[kind] = math.nan
        if not (math.isfinite(weights[kind]) and weights[kind] >= 0):
            raise BenchUsageError(f"--mix weights are numbers of 0 or more, not {raw!r} for {kind}")
    if sum(weights.values()) <= 0:
        raise BenchUsageError("--mix needs at least one weight above 0")
    return weights


def _check_writable(flag: str, path: Path) -> None:
    """Open the file for appending now, so a bad path fails before the run rather than after it."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise BenchUsageError(f"{flag} {path}: cannot write there ({exc.strerror}: {exc.filename})") from None
    if not existed:
        path.unlink(missing_ok=True)
