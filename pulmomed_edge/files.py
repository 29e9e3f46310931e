"""Admin commands on shared folders: one at a time (a lock file), and what one killed half-way
leaves behind (closing the console kills them)."""

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


class LockHeld(Exception):
    """Another process holds the lock."""


def take_lock(lock_path: Path, *, wait: bool = False) -> contextlib.AbstractContextManager[object]:
    """Take the lock file `lock_path`, for the `with` block of what this returns. When another
    process holds it: wait for it with `wait`, else raise LockHeld at once (a caller that waits
    says so first: an admin would see a console that hangs with no word why).

    The OS lets the lock go when its process dies, so a killed command keeps no one out; the
    file itself stays. OSError: the lock file cannot be made or opened (its folder is not
    writable, or another user account's command left it)."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return FileLock(lock_path, blocking=wait).acquire()
    except Timeout:  # a TimeoutError, so an OSError too: it must not reach the caller as one
        raise LockHeld(str(lock_path)) from None
