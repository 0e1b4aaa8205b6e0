"""Teachers: trained once per (architecture, data set, recipe, seed) and cached under `teacher.cache_dir` with a
manifest, or the user's own checkpoint. Weights load with `weights_only=True`; a partly written file is never used."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ackd_search.config import DistillConfig, RunConfig, to_dict
from ackd_search.data import DataSplits, DeviceLoader
from ackd_search.errors import CheckpointError
from ackd_search.files import locked, save_atomic, sha256_file, write_text_atomic
from ackd_search.models import create_model
from ackd_search.train.checkpoints import load_checkpoint
from ackd_search.train.device import autocast_for
from ackd_search.train.loop import Reporter, evaluate, train

# Progress of the teacher's training, handed in by the caller: (description, epochs) -> a per-epoch reporter.
ProgressFactory = Callable[[str, int], Reporter]

WEIGHTS, MANIFEST = "model.pt", "manifest.json"


def teacher_recipe(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the teacher's weights; its hash names the cache entry."""
    data = to_dict(cfg.data)
    return {
        "arch": cfg.teacher.arch,
        "data": {k: data[k] for k in ("name", "val_fraction", "split_seed", "limit")},
        "optim": to_dict(cfg.teacher.optim),
        "seed": cfg.teacher.seed,
    }


def cache_entry(cfg: RunConfig) -> Path:
    recipe = teacher_recipe(cfg)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.teacher.cache_dir) / f"{cfg.teacher.arch}-{cfg.data.name}-{key}"




def read_manifest(entry: Path) -> dict[str, Any] | None:
    """The cached teacher's manifest, or None unless both files are complete and the weights match their hash."""
    manifest_path, weights_path = entry / MANIFEST, entry / WEIGHTS
    if not (manifest_path.is_file() and weights_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("sha256") != sha256_file(weights_path):
        return None
    return manifest


def _train_teacher(cfg: RunConfig, splits: DataSplits, entry: Path,
                   progress: ProgressFactory | None = None) -> dict[str, Any]:
    run_dir = entry / "run"
    teacher_cfg = replace(
        cfg,
        seed=cfg.teacher.seed,
        student=cfg.teacher.arch,
        optim=cfg.teacher.optim,
        distill=DistillConfig(method="student"),
        compile=False,
        eval_test=False,
        output_dir=str(run_dir),
    )
    reporter = progress(f"teacher {cfg.teacher.arch}", teacher_cfg.optim.epochs) if progress else None
    result = train(teacher_cfg, reporter, splits=splits, teacher=None, teacher_info=None)
    save_atomic(result.student_state, entry / WEIGHTS)
    manifest = {
        "arch": cfg.teacher.arch,
        "recipe": teacher_recipe(cfg),
        "val_acc": result.final_val_acc,
        "best_val_acc": result.best_val_acc,
        "params": result.student_params,
        "flops": result.student_flops,
        "device": result.device,
        "wall_time_s": result.wall_time_s,
        "version": result.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sha256": sha256_file(entry / WEIGHTS),
    }
    write_text_atomic(entry / MANIFEST, json.dumps(manifest, indent=1))  # last: its presence means complete
    shutil.rmtree(run_dir, ignore_errors=True)
    return manifest


def _build(cfg: RunConfig, splits: DataSplits, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    model = create_model(cfg.teacher.arch, splits.num_classes, in_channels=splits.in_channels)
    if not isinstance(state, dict):  # e.g. a bare tensor: load_state_dict would raise a TypeError
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict of {cfg.teacher.arch!r}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{source} does not fit teacher.arch {cfg.teacher.arch!r}: {first[:200]}") from None
    return model


def _user_teacher(cfg: RunConfig, splits: DataSplits, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    path = Path(cfg.teacher.checkpoint)
    if not path.is_file():
        raise CheckpointError(f"teacher.checkpoint: file not found: {path}")
    state = load_checkpoint(path)
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    model = _build(cfg, splits, state, f"teacher.checkpoint {path}").to(device).eval()
    loader = DeviceLoader(splits.val, 256, device, splits.mean, splits.std)
    val_acc, _ = evaluate(model, loader, autocast_for(cfg, device))
    return model, {"arch": cfg.teacher.arch, "checkpoint": str(path), "val_acc": val_acc, "sha256": sha256_file(path)}


def get_teacher(cfg: RunConfig, splits: DataSplits, device: torch.device,
                progress: ProgressFactory | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher for `cfg`, in eval mode on `device`, and its manifest (accuracy, recipe, hash); a teacher
    trained now reports its epochs to `progress(description, epochs)` when given."""
    if cfg.teacher.checkpoint:
        return _user_teacher(cfg, splits, device)
    entry = cache_entry(cfg)
    manifest = read_manifest(entry)
    if manifest is None:
        with locked(entry.with_suffix(".lock")):
            manifest = read_manifest(entry)
            if manifest is None:
                if (entry / MANIFEST).exists() or (entry / WEIGHTS).exists():
                    print(f"ackd-search: teacher cache {entry} is incomplete or corrupt (missing file, bad manifest or "
                          "weights that do not match their sha256): training the teacher again", file=sys.stderr,
                          flush=True)
                manifest = _train_teacher(cfg, splits, entry, progress)
    state = load_checkpoint(entry / WEIGHTS)
    model = _build(cfg, splits, state, str(entry / WEIGHTS)).to(device).eval()
    return model, {**manifest, "cache_entry": str(entry)}
