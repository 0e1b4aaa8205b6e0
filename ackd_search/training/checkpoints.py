"""Epoch checkpoints: written atomically, read with `weights_only=True`, and resumed only by the run they belong to
(this code version, this study and trial, this run config); a refusal is one line. A run folder has one owner: the
attempt that claimed it last (`claim_run_dir`); an attempt that lost it (frozen past the grace period while
another process re-ran its trial) writes nothing more there (`owned` raises NotOwner)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ackd_search import __version__
from ackd_search.config import RunConfig, from_dict, to_dict, with_absolute_paths
from ackd_search.errors import CheckpointError, ConfigError
from ackd_search.files import locked, save_atomic, write_text_atomic
from ackd_search.models import load_failure

CHECKPOINT = "checkpoint.pt"
OWNER_FILE = "owner.json"  # {"token", "trial", "pid", "host"} of the attempt that owns the run folder
OWNER_LOCK = ".owner.lock"
OWNER_KEY = "owner"  # the identity's key holding this attempt's token (not part of what a checkpoint must match)
LOCK_WAIT_S = 30.0  # a holder stopped mid-write (SIGSTOP) holds the lock: the others go on after this long


_HELD = threading.local()  # run folders whose lock this thread holds now


class NotOwner(RuntimeError):
    """This attempt no longer owns its run folder: its trial was failed and re-run by another process meanwhile."""


def claim_run_dir(run_dir: Path, owner: dict[str, Any]) -> None:
    """Make the attempt `owner` (its `token` first) the run folder's only writer from now on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir / OWNER_LOCK, timeout_s=LOCK_WAIT_S):
        write_text_atomic(run_dir / OWNER_FILE, json.dumps(owner))


def run_dir_owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


@contextlib.contextmanager
def owned(run_dir: Path | None, token: str | None) -> Iterator[None]:
    """Write into `run_dir` as attempt `token`: NotOwner, before anything is written, when another attempt has
    claimed the folder since. No token (a plain training run) or no owner file: nothing to check."""
    if run_dir is None or not token:
        yield
        return
    key = str(run_dir)
    held = _HELD.__dict__.setdefault("dirs", set())
    # flock is per open file: a second lock of the same folder by this thread would wait for itself.
    lock = contextlib.nullcontext() if key in held else locked(run_dir / OWNER_LOCK, timeout_s=LOCK_WAIT_S)
    with lock:
        owner = run_dir_owner(run_dir)
        if owner is not None and owner.get("token") != token:
            raise NotOwner(f"its run folder {run_dir} was taken over by trial #{owner.get('trial')} (pid "
                           f"{owner.get('pid')} on {owner.get('host')}) while this process was stopped")
        if key in held:
            yield
            return
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def owner_token(identity: dict[str, Any] | None) -> str | None:
    return (identity or {}).get(OWNER_KEY)


def _matched(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a checkpoint's owner must equal: the study and the trial whose folder it is, not the attempt."""
    matched = {k: v for k, v in (identity or {}).items() if k != OWNER_KEY}
    return matched or None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(err)}") from None


def write_checkpoint(path: Path, state: dict[str, Any], identity: dict[str, Any] | None, cfg: RunConfig) -> None:
    """Atomically (a full disk leaves the previous checkpoint whole), and only while this attempt owns the folder."""
    with owned(path.parent, owner_token(identity)):
        save_atomic({**state, "version": __version__, "identity": _matched(identity), "config": to_dict(cfg)}, path)


def read_checkpoint(path: Path, identity: dict[str, Any] | None, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint at `path` if this run may resume it, else a one-line CheckpointError."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "epochs_done" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project; use a new output_dir")
    check_owner(path, state, identity)
    if comparable(state.get("config") or {}) != comparable(to_dict(cfg)):
        raise CheckpointError(f"{path} was written by a different run config; use a new output_dir")
    return state


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as a checkpoint must match it: defaults filled in (a field added since the checkpoint was
    written takes its default), paths resolved; `cuda_graphs` and `teacher.output_cache` left out (they change how
    the step runs, not what it computes, so a run may resume with them switched), and `data.cache_dir`."""
    try:
        config = to_dict(from_dict(RunConfig, config))
    except ConfigError:
        pass  # compared as written: it differs from any valid config, which is the answer
    out = with_absolute_paths(config)
    out.pop("cuda_graphs", None)
    (out.get("teacher") or {}).pop("output_cache", None)
    (out.get("data") or {}).pop("cache_dir", None)  # where decoded images are kept, not what they are
    return out


def _describe_owner(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "no study (a plain training run)"
    parts = [f"{key} {value!r}" for key, value in identity.items()
             if key not in ("study", OWNER_KEY) and value is not None]
    name = f"study {identity['study']!r}" if "study" in identity else ""
    return " ".join(p for p in (name, f"({', '.join(parts)})" if parts else "") if p)


def check_owner(path: Path, state: dict[str, Any], identity: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written by another code version or for another study / trial, in one line."""
    version = state.get("version")
    if version != __version__:
        written = f"ackd-search {version}" if version else "an older ackd-search (no version recorded)"
        raise CheckpointError(f"{path} was written by {written}, this is {__version__}; "
                              f"delete it or use a new runs folder")
    saved = _matched(state.get("identity"))
    if saved != _matched(identity):
        raise CheckpointError(f"{path} belongs to {_describe_owner(saved)}, not {_describe_owner(identity)}; "
                              f"delete it or use a new runs folder")
