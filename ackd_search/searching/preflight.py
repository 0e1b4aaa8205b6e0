"""Before the study is touched: the data read and the teacher trained or loaded once, so a missing data folder or a
broken teacher checkpoint is one error instead of a failure in every trial, and a teacher trained here is cached."""

from __future__ import annotations

from collections.abc import Callable

from ackd_search.config import ConfigError
from ackd_search.data import DataSplits, get_splits
from ackd_search.errors import CheckpointError, ModelError, WeightsError
from ackd_search.models import initial_model
from ackd_search.searching.confirm import plan_settings
from ackd_search.searching.space import Space
from ackd_search.searching.stats import separability_warning
from ackd_search.training import resolve_device
from ackd_search.training.teachers import ProgressFactory, cache_entry, get_teacher, read_manifest


def describe_data(splits: DataSplits) -> str:
    """`data digits: 10 classes, 1,293 / 144 / 360 images (train / val / test), 8x8, 1 channel`, with the class
    names when the source has them."""
    names = ""
    if splits.classes:
        shown = ", ".join(splits.classes[:8]) + (f", ... ({len(splits.classes)})" if len(splits.classes) > 8 else "")
        names = f" ({shown})"
    channels = "1 channel" if splits.in_channels == 1 else f"{splits.in_channels} channels"
    return (f"data {splits.name}: {splits.num_classes} classes{names}, {len(splits.train):,} / {len(splits.val):,} / "
            f"{len(splits.test):,} images (train / val / test), {splits.image_size}x{splits.image_size}, {channels}")


def preflight(space: Space, log: Callable[[str], None] = print, progress: ProgressFactory | None = None) -> None:
    """Read the data and get the teacher once (trained now if no process has, reporting to `progress`)."""
    cfg = space.run_config(space.default_values())
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError([f"{space.source}: run.device: {err}"]) from None
    splits = get_splits(cfg.data)
    log(describe_data(splits))
    if cfg.student_init or cfg.student_pretrained:  # a missing or unfit file fails here once, not in every trial
        try:
            initial_model(cfg.student, splits.num_classes, splits.in_channels, cfg.student_init,
                          cfg.student_pretrained)
        except (WeightsError, ModelError) as err:
            raise CheckpointError(f"run.student_init: {err}") from None
    warning = separability_warning(len(splits.val), plan_settings(space).seeds, val_fraction=cfg.data.val_fraction)
    if warning:
        log(f"note: {warning}; the confirmation will say which gaps it could not separate")
    if space.methods() == ["student"]:
        return
    if not cfg.teacher.checkpoint and read_manifest(cache_entry(cfg)) is None:
        log(f"training the teacher {cfg.teacher.arch} on {cfg.data.name} once ({cfg.teacher.optim.epochs} epochs); "
            f"every trial reads it from {cfg.teacher.cache_dir}")
    teacher, info = get_teacher(cfg, splits, device, progress)
    del teacher
    where = info.get("cache_entry") or info.get("checkpoint")
    log(f"teacher {cfg.teacher.arch}: val_acc {info['val_acc']:.2f} ({where})")
