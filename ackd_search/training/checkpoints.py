"""Epoch checkpoints: written atomically, read with `weights_only=True`, and resumed only by the run they belong to
(this code version, this study and trial, this run config); a refusal is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ackd_search import __version__
from ackd_search.config import RunConfig, from_dict, to_dict, with_absolute_paths
from ackd_search.errors import CheckpointError, ConfigError
from ackd_search.files import save_atomic
from ackd_search.models import load_failure

CHECKPOINT = "checkpoint.pt"


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(err)}") from None


def write_checkpoint(path: Path, state: dict[str, Any], identity: dict[str, Any] | None, cfg: RunConfig) -> None:
    save_atomic({**state, "version": __version__, "identity": identity, "config": to_dict(cfg)}, path)


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
    parts = [f"{key} {value!r}" for key, value in identity.items() if key != "study" and value is not None]
    name = f"study {identity['study']!r}" if "study" in identity else ""
    return " ".join(p for p in (name, f"({', '.join(parts)})" if parts else "") if p)


def check_owner(path: Path, state: dict[str, Any], identity: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written by another code version or for another study / trial, in one line."""
    version = state.get("version")
    if version != __version__:
        written = f"ackd-search {version}" if version else "an older ackd-search (no version recorded)"
        raise CheckpointError(f"{path} was written by {written}, this is {__version__}; "
                              f"delete it or use a new runs folder")
    saved = state.get("identity")
    if (saved or None) != (identity or None):
        raise CheckpointError(f"{path} belongs to {_describe_owner(saved)}, not {_describe_owner(identity)}; "
                              f"delete it or use a new runs folder")
