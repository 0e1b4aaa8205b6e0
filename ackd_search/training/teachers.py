"""Teachers: trained once per (architecture, data set, recipe, seed), or fine-tuned once from the user's checkpoint or
pretrained weights, and cached under `teacher.cache_dir` with a manifest; or the user's weights used as they are
(`given_teacher.py`). Weights load with `weights_only=True`; a partly written file is never used."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ackd_search.config import DistillConfig, RunConfig, to_dict
from ackd_search.data import DataSplits, data_key
from ackd_search.errors import CheckpointError, ModelError, WeightsError
from ackd_search.files import locked, save_atomic, sha256_file, write_text_atomic
from ackd_search.models import create_model, load_original_state_dict, read_state_dict
from ackd_search.notices import notice
from ackd_search.training.given_teacher import given_teacher
from ackd_search.training.loop import Reporter, train

# Progress of the teacher's training, handed in by the caller: (description, epochs) -> a per-epoch reporter.
ProgressFactory = Callable[[str, int], Reporter]

WEIGHTS, MANIFEST = "model.pt", "manifest.json"


def teacher_recipe(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the teacher's weights; its hash names the cache entry. Keys for a starting point
    (a checkpoint, pretrained weights, a user's builder file) are there only when one is given, so an entry of a
    teacher trained from scratch keeps its name across versions."""
    t = cfg.teacher
    recipe: dict[str, Any] = {"arch": t.arch, "data": data_key(cfg.data), "optim": to_dict(t.finetune or t.optim),
                              "seed": t.seed}
    if t.checkpoint:
        recipe["init"] = {"checkpoint_sha256": sha256_file(Path(t.checkpoint))}
    elif t.pretrained:
        recipe["init"] = {"pretrained": t.arch}
    if t.arch.startswith("py:"):
        recipe["builder_sha256"] = sha256_file(Path(t.arch[3:].rpartition(":")[0]))
    return recipe


def cache_entry(cfg: RunConfig) -> Path:
    recipe = teacher_recipe(cfg)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.teacher.arch}-{cfg.data.name}")  # timm:, py:a/b.py:f -> a name
    return Path(cfg.teacher.cache_dir) / f"{label}-{key}"


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
    """Train the teacher from scratch, or fine-tune its checkpoint / pretrained weights (`teacher.finetune`), into
    the cache entry; the manifest is written last."""
    run_dir = entry / "run"
    t = cfg.teacher
    teacher_cfg = replace(
        cfg,
        seed=t.seed,
        student=t.arch,
        student_init=t.checkpoint if t.finetune else None,
        student_pretrained=t.pretrained and t.finetune is not None,
        optim=t.finetune or t.optim,
        distill=DistillConfig(method="student"),
        compile=False,
        eval_test=False,
        output_dir=str(run_dir),
    )
    what = "fine-tuning the teacher" if t.finetune else "teacher"
    reporter = progress(f"{what} {t.arch}", teacher_cfg.optim.epochs) if progress else None
    try:
        result = train(teacher_cfg, reporter, splits=splits, teacher=None, teacher_info=None)
    except (WeightsError, ModelError) as err:  # unusable starting weights: one line here, not a traceback per trial
        shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(err, WeightsError):  # "<checkpoint> does not fit the model: missing keys: ..."
            raise CheckpointError(f"teacher.checkpoint {err}") from None
        raise CheckpointError(f"{'teacher.pretrained' if t.pretrained else 'teacher.arch'}: {err}") from None
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


def cached_model(cfg: RunConfig, splits: DataSplits, weights: Path) -> nn.Module:
    """The cached teacher's architecture with its weights (stored in our staged names)."""
    model = create_model(cfg.teacher.arch, splits.num_classes, in_channels=splits.in_channels)
    try:
        load_original_state_dict(model, read_state_dict(weights), str(weights))
    except WeightsError as err:
        raise CheckpointError(f"teacher cache {weights}: {err}") from None
    return model


def get_teacher(cfg: RunConfig, splits: DataSplits, device: torch.device,
                progress: ProgressFactory | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher for `cfg`, in eval mode on `device`, and its manifest (accuracy, recipe, hash); a teacher
    trained now reports its epochs to `progress(description, epochs)` when given."""
    if cfg.teacher.finetune is None and (cfg.teacher.checkpoint or cfg.teacher.pretrained):
        return given_teacher(cfg, splits, device)
    entry = cache_entry(cfg)
    manifest = read_manifest(entry)
    if manifest is None:
        with locked(entry.with_suffix(".lock")):
            manifest = read_manifest(entry)
            if manifest is None:
                if (entry / MANIFEST).exists() or (entry / WEIGHTS).exists():
                    notice(f"teacher cache {entry} is incomplete or corrupt (missing file, bad manifest or weights "
                           "that do not match their sha256): training the teacher again")
                manifest = _train_teacher(cfg, splits, entry, progress)
    model = cached_model(cfg, splits, entry / WEIGHTS).to(device).eval()
    return model, {**manifest, "cache_entry": str(entry)}
