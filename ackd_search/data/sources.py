"""Which data set a run reads: each source's loader (built-in, imagefolder, arrays, torchvision) and `get_splits`,
which reads a data config's splits once per process so every trial of a search shares the same tensors."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from ackd_search.config import DataConfig
from ackd_search.data.arrays import load_arrays
from ackd_search.data.augment_policy import AUGMENT_SETTINGS, augment_for
from ackd_search.data.cifar import load_cifar
from ackd_search.data.digits import load_digits
from ackd_search.data.imagefolder import load_imagefolder
from ackd_search.data.names import BUILTIN, DATASETS, TORCHVISION_PREFIX, check_name
from ackd_search.data.splits import (
    DataSplits,
    build_splits,
    cap,
    channel_stats,
    check_labels,
    given_stats,
    plan_splits,
    split_indices,
    take,
)
from ackd_search.data.torchvision_sources import load_torchvision
from ackd_search.errors import DataError

__all__ = ["DATASETS", "data_key", "get_splits", "load_splits"]

_BUILTIN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
_CIFAR_ALIASES = {"torchvision:CIFAR10": "cifar10", "torchvision:CIFAR100": "cifar100"}  # the same files and loader
_KEY_FIELDS = ("name", "val_fraction", "split_seed", "limit")  # what the teacher cache has always keyed


def _check_args(cfg: DataConfig) -> None:
    check_name(cfg.name)
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {cfg.val_fraction}")
    if cfg.limit is not None and cfg.limit < 2:
        raise DataError(f"limit must be an integer >= 2 (or None), got {cfg.limit}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise DataError(f"image_size must be an integer >= 8 (or None), got {cfg.image_size}")
    if cfg.channels not in ("auto", "rgb", "grey"):
        raise DataError(f"unknown channels {cfg.channels!r}; allowed: auto, rgb, grey")
    if cfg.augment not in AUGMENT_SETTINGS:
        raise DataError(f"unknown augment {cfg.augment!r}; allowed: {', '.join(AUGMENT_SETTINGS)}")
    if cfg.name != "imagefolder" and cfg.channels != "auto":
        raise DataError(f"{cfg.name}: channels is read by the imagefolder source only; leave it at auto")


def _check_native(cfg: DataConfig, splits: DataSplits) -> DataSplits:
    # Only an imagefolder is decoded (and so resized); elsewhere image_size can only confirm the data's own size.
    if cfg.image_size is not None and cfg.image_size != splits.image_size:
        raise DataError(f"{cfg.name}: image_size {cfg.image_size} is read by the imagefolder source only ("
                        f"{cfg.name} images are {splits.image_size}x{splits.image_size}); leave image_size unset")
    if cfg.num_classes is not None and cfg.num_classes != splits.num_classes:
        raise DataError(f"{cfg.name}: num_classes is {cfg.num_classes} but the data has {splits.num_classes} classes; "
                        f"leave num_classes unset")
    return splits


def _builtin(cfg: DataConfig) -> DataSplits:
    # Today's digits / CIFAR path, step for step: these tensors and splits must never change.
    name = _CIFAR_ALIASES.get(cfg.name, cfg.name)
    if name == "digits":
        pool, test = load_digits()
    else:
        pool, test = load_cifar(name, Path(cfg.data_root).expanduser().resolve(), cfg.download)
    pool, test = cap(pool, cfg.limit), cap(test, cfg.limit)
    num_classes = _BUILTIN_CLASSES[name]
    check_labels(name, num_classes, pool, test)
    train_idx, val_idx = split_indices(pool.y.numpy(), test_size=cfg.val_fraction, seed=cfg.split_seed)
    train, val = take(pool, train_idx), take(pool, val_idx)
    channels, size = int(train.x.shape[1]), int(train.x.shape[-1])
    mean, std = given_stats(cfg.name, cfg.mean, cfg.std, channels) or channel_stats(train.x)
    return DataSplits(name=cfg.name, train=train, val=val, test=test, num_classes=num_classes,
                      in_channels=channels, image_size=size, mean=mean, std=std,
                      augment=augment_for(cfg.name, size, cfg.augment))


def _torchvision(cfg: DataConfig) -> DataSplits:
    pool, test, classes = load_torchvision(cfg.name[len(TORCHVISION_PREFIX):],
                                           Path(cfg.data_root).expanduser().resolve(), cfg.download)
    num_classes = len(classes) if classes else int(max(pool.y.max(), test.y.max())) + 1
    plan = plan_splits(cfg.name, {"train": pool.y.numpy(), "val": None, "test": test.y.numpy()},
                       val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, limit=cfg.limit)
    size = int(pool.x.shape[-1])
    return build_splits(cfg.name, {"train": pool, "test": test}, plan, num_classes=num_classes,
                        augment=augment_for(cfg.name, size, cfg.augment), classes=classes, mean=cfg.mean, std=cfg.std)


def load(cfg: DataConfig) -> DataSplits:
    """The DataSplits `cfg` names, read now (no per-process caching: see `get_splits`)."""
    _check_args(cfg)
    if cfg.name == "imagefolder":
        return load_imagefolder(cfg)
    if cfg.name == "arrays":
        return _check_native(cfg, load_arrays(cfg))
    if cfg.name in BUILTIN or cfg.name in _CIFAR_ALIASES:
        return _check_native(cfg, _builtin(cfg))
    return _check_native(cfg, _torchvision(cfg))


def load_splits(name: str, data_root: str | Path = "data", val_fraction: float = 0.1, split_seed: int = 0,
                download: bool = True, limit: int | None = None, **options: Any) -> DataSplits:
    """Load `name` as uint8 train/val/test splits; val is a stratified split of the training data (split_seed).
    `options` are DataConfig's other fields (image_size, channels, mean, std, num_classes, augment, cache_dir)."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DataError(f"unknown data option {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    return load(DataConfig(name=name, data_root=str(data_root), val_fraction=val_fraction, split_seed=split_seed,
                           download=download, limit=limit, **options))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=4)
def _cached_splits(items: tuple[tuple[str, Any], ...]) -> DataSplits:
    return load(DataConfig(**dict(items)))


def get_splits(cfg: DataConfig) -> DataSplits:
    """Data sets are read once per process; every trial of a search shares the same tensors."""
    return _cached_splits(tuple((f.name, _hashable(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)))


def data_key(cfg: DataConfig) -> dict[str, Any]:
    """The config fields that decide a run's data, for cache keys (the teacher's): exactly today's four fields for
    a built-in set left at its defaults (existing caches stay valid), plus every field that matters otherwise."""
    defaults = DataConfig()
    extra = [f.name for f in dataclasses.fields(cfg)
             if f.name not in _KEY_FIELDS + ("data_root", "download", "cache_dir")]
    key = {k: getattr(cfg, k) for k in _KEY_FIELDS}
    if cfg.name in BUILTIN and all(getattr(cfg, k) == getattr(defaults, k) for k in extra):
        return key
    key.update({k: getattr(cfg, k) for k in extra})
    if cfg.name not in BUILTIN:
        key["data_root"] = str(Path(cfg.data_root).expanduser().resolve())
    return key
