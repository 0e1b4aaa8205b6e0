"""Builds one run and trains it: the data splits and the teacher are loaded here and handed to `trainer.train`, so
the trainer never fetches its own teacher (the loop never imports `teachers`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ackd_search.config import RunConfig
from ackd_search.data import DataSplits, get_splits
from ackd_search.distill import Distiller
from ackd_search.training.device import resolve_device
from ackd_search.training.loop import Reporter, Run, RunResult, train
from ackd_search.training.output_cache import teacher_outputs_for
from ackd_search.training.teachers import ProgressFactory, get_teacher


def load_teacher(cfg: RunConfig, splits: DataSplits, progress: ProgressFactory | None = None,
                 ) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The frozen teacher `cfg` names and its manifest (trained and cached on first use); (None, None) for the
    student alone, which never touches the teacher cache."""
    if cfg.distill.method == "student":
        return None, None
    return get_teacher(cfg, splits, resolve_device(cfg.device), progress)


def run_training(cfg: RunConfig, reporter: Reporter | None = None, identity: dict[str, Any] | None = None,
                 teacher_progress: ProgressFactory | None = None) -> RunResult:
    """Load `cfg`'s data and teacher and the teacher's output cache (`teacher.output_cache`: computed once, beside
    the cached teacher), then `train` it (resuming its checkpoint when that belongs to `identity`). A teacher trained
now reports its epochs to `teacher_progress(description, epochs)`."""
    resolve_device(cfg.device)  # a bad device name fails before any data is read or teacher trained
    splits = get_splits(cfg.data)
    teacher, teacher_info = load_teacher(cfg, splits, teacher_progress)
    outputs, status = teacher_outputs_for(cfg, splits, teacher, teacher_info, resolve_device(cfg.device))
    return train(cfg, reporter, splits=splits, teacher=teacher, teacher_info=teacher_info, identity=identity,
                 teacher_outputs=outputs, teacher_output_cache=status)


def distiller_for(cfg: RunConfig) -> Distiller:
    """The distiller `run_training` would train (teacher included), without training; for tests and benchmarks."""
    splits = get_splits(cfg.data)
    teacher, teacher_info = load_teacher(cfg, splits)
    return Run(cfg, None, splits=splits, teacher=teacher, teacher_info=teacher_info).distiller
