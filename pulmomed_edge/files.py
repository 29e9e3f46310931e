"""Admin commands on shared folders: one at a time (a lock file), and what one killed half-way
leaves behind (closing the console kills them)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from pathlib import Path


def remove_leftovers(folder: Path, patterns: Iterable[str]) -> None:
    """Remove the entries of `folder` matching `patterns` (temp dirs or files) that a command
    killed half-way left. Call it holding the folder's lock (take_lock): a command still running
    would hold it, so every match is a dead one's. (Entries younger than an hour were kept before
    the lock, in case they were a running command's; a fetch retried at once after a killed one
    then kept ~1 GB of wheels for that hour.)"""
    if not folder.is_dir():
        return
    for pattern in patterns:
        for leftover in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and not leftover.is_symlink():
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
