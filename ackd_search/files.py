"""Files written so that a crash or a second process never sees half of one: atomic replace, checksums, and the
cross-process lock that serialises building a shared cache entry (teachers, teacher outputs, decoded images)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path, timeout_s: float | None = None) -> Iterator[bool]:
    """An exclusive lock on `path` across processes: the second waits, then finds what the first built. With
    `timeout_s`, it waits that long at most and goes on without the lock (yields False): a holder that is stopped
    (SIGSTOP, a frozen machine) must not stop everyone else. The kernel releases a dead holder's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        held = _lock(handle, timeout_s)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _lock(handle: IO, timeout_s: float | None) -> bool:
    if timeout_s is None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def temporary_name(path: Path) -> Path:
    """A sibling name no other process uses, for a file about to replace `path`."""
    return path.with_name(path.name + f".tmp{os.getpid()}")


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file, then rename: `path` is the old file or the new one, never half of one."""
    tmp = temporary_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(file)` into a temporary file, then rename: a full disk (or a crash) leaves the previous `path` whole
    and no half file behind."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))


_VERIFIED: set[tuple[str, int, int]] = set()  # (file, size, mtime_ns) whose sha256 this process already checked


def matches_sha256(path: Path, expected: str | None) -> bool:
    """Whether `path` hashes to `expected`; a file this process checked before, unchanged since (same size and
    mtime), is not read again, so every trial after the first skips rereading a cache of gigabytes."""
    stat = path.stat()
    mark = (str(path), stat.st_size, stat.st_mtime_ns)
    if mark in _VERIFIED:
        return True
    if expected != sha256_file(path):
        return False
    _VERIFIED.add(mark)
    return True


def mark_verified(path: Path) -> None:
    """`path` was just written and hashed by this process: `matches_sha256` need not read it again."""
    stat = path.stat()
    _VERIFIED.add((str(path), stat.st_size, stat.st_mtime_ns))
