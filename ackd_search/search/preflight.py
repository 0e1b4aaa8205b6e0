"""Before the study is touched: the data read and the teacher trained or loaded once, so a missing data folder or a
broken teacher checkpoint is one error instead of a failure in every trial, and a teacher trained here is cached."""

from __future__ import annotations

from collections.abc import Callable

from ackd_search.config import ConfigError
from ackd_search.data import get_splits
from ackd_search.search.space import Space
from ackd_search.train import resolve_device
from ackd_search.train.teachers import ProgressFactory, cache_entry, get_teacher, read_manifest


def preflight(space: Space, log: Callable[[str], None] = print, progress: ProgressFactory | None = None) -> None:
    """Read the data and get the teacher once (trained now if no process has, reporting to `progress`)."""
    cfg = space.run_config(space.default_values())
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError([f"{space.source}: run.device: {err}"]) from None
    splits = get_splits(cfg.data)
    if space.methods() == ["student"]:
        return
    if not cfg.teacher.checkpoint and read_manifest(cache_entry(cfg)) is None:
        log(f"training the teacher {cfg.teacher.arch} on {cfg.data.name} once ({cfg.teacher.optim.epochs} epochs); "
            f"every trial reads it from {cfg.teacher.cache_dir}")
    teacher, info = get_teacher(cfg, splits, device, progress)
    del teacher
    where = info.get("cache_entry") or info.get("checkpoint")
    log(f"teacher {cfg.teacher.arch}: val_acc {info['val_acc']:.2f} ({where})")
