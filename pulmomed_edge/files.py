"""What admin commands killed half-way leave behind (closing the console kills them)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

# younger entries may belong to a build or fetch running right now
LEFTOVER_AGE_S = 3600


def remove_leftovers(folder: Path, patterns: Iterable[str]) -> None:
    """Remove the entries of `folder` matching `patterns` (temp dirs or files) that are
    LEFTOVER_AGE_S old or more."""
    if not folder.is_dir():
        return
    now = time.time()
    for pattern in patterns:
        for leftover in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime < LEFTOVER_AGE_S:
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
