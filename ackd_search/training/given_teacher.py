"""A teacher the user gives and uses as it is: their state-dict file, or the library's pretrained weights (no
fine-tuning). Its head must fit the data; its validation accuracy is measured once per process and data set, and
nothing is written to the teacher cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ackd_search.config import RunConfig
from ackd_search.data import DataSplits, DeviceLoader, data_key
from ackd_search.errors import CheckpointError, ModelError, WeightsError
from ackd_search.files import sha256_file
from ackd_search.models import create_model, head_mismatch, load_original_state_dict, read_state_dict
from ackd_search.training.device import autocast_for
from ackd_search.training.loop import evaluate

FIX = "fine-tune it with `teacher.finetune: {epochs: N, lr: X}`, or give a matching checkpoint"


_MEASURED: dict[tuple[str, str], float] = {}  # (weights sha256, data key) -> validation accuracy (%)


def _identity(cfg: RunConfig) -> tuple[str, str]:
    """(sha256 naming the weights, the folder beside the teacher cache where what is measured of them is kept)."""
    t = cfg.teacher
    if t.checkpoint:
        sha = sha256_file(Path(t.checkpoint))
        return sha, str(Path(t.cache_dir) / f"checkpoint-{sha[:16]}")
    sha = hashlib.sha256(f"pretrained {t.arch} torch {torch.__version__}".encode()).hexdigest()
    return sha, str(Path(t.cache_dir) / f"pretrained-{sha[:16]}")


def _model(cfg: RunConfig, splits: DataSplits) -> nn.Module:
    t = cfg.teacher
    if t.checkpoint and t.pretrained:
        raise CheckpointError("teacher: give checkpoint or pretrained, not both")
    if t.pretrained:
        model = create_model(t.arch, splits.num_classes, in_channels=splits.in_channels, pretrained=True)
        outputs = model.head.fc.out_features
        if outputs != splits.num_classes:
            raise CheckpointError(f"teacher.pretrained: teacher head has {outputs} outputs, the data set has "
                                  f"{splits.num_classes} classes: {FIX}")
        return model
    path = Path(t.checkpoint)
    if not path.is_file():
        raise CheckpointError(f"teacher.checkpoint: file not found: {path}")
    state = read_state_dict(path)
    model = create_model(t.arch, splits.num_classes, in_channels=splits.in_channels)
    mismatch = head_mismatch(model, state, splits.num_classes)
    if mismatch:
        raise CheckpointError(f"teacher.checkpoint {path}: teacher {mismatch}: {FIX}")
    load_original_state_dict(model, state, f"teacher.checkpoint {path}")
    return model


def _val_acc(cfg: RunConfig, model: nn.Module, splits: DataSplits, device: torch.device, sha: str) -> float:
    """The teacher's validation accuracy on this data, measured the first time this process needs it."""
    key = (sha, json.dumps(data_key(cfg.data), sort_keys=True, default=str))
    if key not in _MEASURED:
        loader = DeviceLoader(splits.val, 256, device, splits.mean, splits.std)
        _MEASURED[key] = evaluate(model, loader, autocast_for(cfg, device))[0]
    return _MEASURED[key]


def given_teacher(cfg: RunConfig, splits: DataSplits, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The user's teacher weights as they are, frozen on `device`, and what is known of them."""
    try:
        model = _model(cfg, splits).to(device).eval()
    except WeightsError as err:
        raise CheckpointError(str(err)) from None
    except ModelError as err:  # pretrained weights that cannot be fetched (offline), a builder that fails
        raise CheckpointError(f"{'teacher.pretrained' if cfg.teacher.pretrained else 'teacher.arch'}: {err}") from None
    sha, folder = _identity(cfg)
    info: dict[str, Any] = {"arch": cfg.teacher.arch, "sha256": sha, "given_dir": folder,
                            "val_acc": _val_acc(cfg, model, splits, device, sha)}
    if cfg.teacher.checkpoint:
        info["checkpoint"] = cfg.teacher.checkpoint
    else:
        info["pretrained"] = True
    return model, info
