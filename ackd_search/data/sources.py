"""Which data set a run reads: each source's loader, class count and standard augmentation, and `get_splits`, which
reads a data config's splits once per process so every trial of a search shares the same tensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ackd_search.config import DataConfig
from ackd_search.data.cifar import load_cifar
from ackd_search.data.digits import load_digits
from ackd_search.data.splits import Augment, DataSplits, cap, channel_stats, check_labels, split_indices, take
from ackd_search.errors import DataError

DATASETS = ("digits", "cifar10", "cifar100")


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    augment: Augment


_SPECS = {
    "digits": _Spec(10, Augment(pad=1, flip=False)),  # digits are not mirror-invariant
    "cifar10": _Spec(10, Augment(pad=4, flip=True)),
    "cifar100": _Spec(100, Augment(pad=4, flip=True)),
}


def _check_args(name: str, val_fraction: float, limit: int | None) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if limit is not None and limit < 2:
        raise DataError(f"limit must be an integer >= 2 (or None), got {limit}")


def load_splits(name: str, data_root: str | Path = "data", val_fraction: float = 0.1,
                split_seed: int = 0, download: bool = True, limit: int | None = None) -> DataSplits:
    """Load `name` as uint8 train/val/test splits; val is a stratified split of the training data (split_seed)."""
    _check_args(name, val_fraction, limit)
    if name == "digits":
        pool, test = load_digits()
    else:
        pool, test = load_cifar(name, Path(data_root).expanduser().resolve(), download)
    pool, test = cap(pool, limit), cap(test, limit)
    spec = _SPECS[name]
    check_labels(name, spec.num_classes, pool, test)
    train_idx, val_idx = split_indices(pool.y.numpy(), test_size=val_fraction, seed=split_seed)
    train, val = take(pool, train_idx), take(pool, val_idx)
    mean, std = channel_stats(train.x)
    return DataSplits(name=name, train=train, val=val, test=test, num_classes=spec.num_classes,
                      in_channels=int(train.x.shape[1]), image_size=int(train.x.shape[-1]),
                      mean=mean, std=std, augment=spec.augment)


@functools.lru_cache(maxsize=4)
def _cached_splits(name: str, data_root: str, val_fraction: float, split_seed: int, download: bool, limit):
    return load_splits(name, data_root, val_fraction, split_seed, download, limit)


def get_splits(cfg: DataConfig) -> DataSplits:
    """Data sets are read once per process; every trial of a search shares the same tensors."""
    return _cached_splits(cfg.name, cfg.data_root, cfg.val_fraction, cfg.split_seed, cfg.download, cfg.limit)
