"""The data every trial shares: uint8 tensor splits (train / val / test) with the data set's augmentation and
channel statistics, and the fixed, stratified splitting, carving and subsampling that keep one val set per search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ackd_search.data.resized_crop import ResizedCropFlip
from ackd_search.errors import DataError
from ackd_search.notices import notice

FIXED_SEED = 0  # the digits test carve and the `limit` subsample must not move with split_seed
CARVED_TEST_FRACTION = 0.2  # a source without a test split gets this fixed, stratified share of its training data


def log(text: str) -> None:
    """The data layer's one-line notes (decoding, cache reads, carved splits, skipped files), on stderr."""
    notice(f"data: {text}")


@dataclass(frozen=True)
class Augment:
    """Random crop from the image zero-padded by `pad`, then a random horizontal flip (when `flip`).

    Every augmented image is one of `num_views` VIEWS of its source image, numbered
    v = (dy * side + dx) * flips + f with side = 2 * pad + 1, (dy, dx) the crop origin, f the flip (0/1)."""

    pad: int  # random-crop padding in pixels (0 = no crop)
    flip: bool  # random horizontal flip

    @property
    def side(self) -> int:
        return 2 * self.pad + 1

    @property
    def num_views(self) -> int:
        return self.side * self.side * (2 if self.flip else 1)

    def view_index(self, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """View numbers (B,) of crop origins (B, 2) and flips (B,)."""
        cell = offsets[:, 0] * self.side + offsets[:, 1]
        return cell * 2 + flips.long() if self.flip else cell

    def decode(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets (B, 2), flips (B,)) of view numbers: the inverse of `view_index`."""
        flips = (views % 2).bool() if self.flip else torch.zeros_like(views, dtype=torch.bool)
        cell = views // 2 if self.flip else views
        return torch.stack([cell // self.side, cell % self.side], dim=1), flips


@dataclass
class TensorSplit:
    x: torch.Tensor  # uint8, (N, C, H, W), CPU
    y: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataSplits:
    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, in [0,1] units, computed on the train split
    std: tuple[float, ...]
    augment: Augment | ResizedCropFlip  # the data set's standard training augmentation (augment_policy.py)
    classes: tuple[str, ...] | None = None  # class names by label, where the source names them


def split_indices(y: np.ndarray, *, test_size: float | None = None, train_size: int | None = None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    try:
        a, b = train_test_split(idx, test_size=test_size, train_size=train_size, random_state=seed, stratify=y)
    except ValueError:
        # Too few samples for every class to appear on both sides (tiny `limit`s): an unstratified split,
        # still fixed by the seed, beats refusing a smoke run.
        a, b = train_test_split(idx, test_size=test_size, train_size=train_size, random_state=seed)
    return np.sort(a), np.sort(b)  # keep the original order inside each side


def take(split: TensorSplit, idx: np.ndarray) -> TensorSplit:
    index = torch.from_numpy(idx)
    return TensorSplit(x=split.x[index].contiguous(), y=split.y[index].contiguous())


def cap_indices(y: np.ndarray, limit: int | None) -> np.ndarray:
    """The sorted rows `limit` keeps of labels `y` (all of them when they fit): stratified, fixed seed."""
    if limit is None or len(y) <= limit:
        return np.arange(len(y))
    kept, _ = split_indices(y, train_size=limit, seed=FIXED_SEED)
    return kept


def cap(split: TensorSplit, limit: int | None) -> TensorSplit:
    if limit is None or len(split) <= limit:
        return split
    return take(split, cap_indices(split.y.numpy(), limit))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 (N, C, H, W) tensor, in [0,1] units.

    A 256-bin histogram per channel is exact and avoids a float copy of the whole split."""
    counts = [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]
    return stats_from_counts(torch.stack(counts) if counts else torch.zeros(0, 256, dtype=torch.int64))


def stats_from_counts(counts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`channel_stats` from per-channel 256-bin histograms (C, 256): what a decoder accumulates image by image."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(counts.shape[0]):
        channel = counts[c].to(torch.float64)
        total = channel.sum().clamp_min(1.0)
        mean = float((channel * values).sum() / total)
        var = float((channel * values.square()).sum() / total) - mean * mean
        means.append(mean)
        stds.append(max(math.sqrt(max(var, 0.0)), 1e-6))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def check_labels(name: str, num_classes: int, *splits: TensorSplit) -> None:
    # Hand-made files with wrong labels would otherwise surface later as a CUDA assert in the loss.
    for split in splits:
        if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
            raise DataError(f"{name}: labels outside 0..{num_classes - 1} in the data files")



@dataclass(frozen=True)
class Plan:
    """Which rows each split takes: split name -> (the source split it reads, sorted row indices into it)."""

    rows: dict[str, tuple[str, np.ndarray]]
    carved: tuple[str, ...]  # the splits ("val", "test") carved out of the source's training data

    def note(self, val_fraction: float, split_seed: int) -> str:
        """How val and test were made, for the one line a source logs; empty when both came with the data."""
        parts = []
        if "val" in self.carved:
            parts.append(f"val carved from train ({val_fraction:g}, stratified, split_seed {split_seed})")
        if "test" in self.carved:
            parts.append(f"no test split given: test carved from train (fixed {CARVED_TEST_FRACTION:g}, stratified, "
                         f"seed {FIXED_SEED})")
        return "; ".join(parts)


def plan_splits(name: str, labels: dict[str, np.ndarray | None], *, val_fraction: float, split_seed: int,
                limit: int | None) -> Plan:
    """Carve what a source lacks, the way the built-in sets do: a missing test split is a fixed stratified share of
    the training data (FIXED_SEED, like digits), `limit` caps each side, and a missing val split is a stratified
    `val_fraction` of the rest (split_seed, like `load_splits`)."""
    pool_y = labels["train"]
    carved: list[str] = []
    try:
        pool = np.arange(len(pool_y))
        if labels.get("test") is None:
            pool, test = split_indices(pool_y, test_size=CARVED_TEST_FRACTION, seed=FIXED_SEED)
            test_source = "train"
            carved.append("test")
        else:
            test, test_source = np.arange(len(labels["test"])), "test"
        pool = pool[cap_indices(pool_y[pool], limit)]
        test = test[cap_indices(labels[test_source][test], limit)]
        if labels.get("val") is None:
            train_idx, val_idx = split_indices(pool_y[pool], test_size=val_fraction, seed=split_seed)
            train, val, val_source = pool[train_idx], pool[val_idx], "train"
            carved.insert(0, "val")
        else:
            train, val, val_source = pool, cap_indices(labels["val"], limit), "val"
    except ValueError as exc:  # scikit-learn refuses splits of a handful of samples
        raise DataError(f"{name}: {len(pool_y)} training images are too few to carve "
                        f"{' and '.join(carved) or 'the splits'} from ({exc})") from None
    return Plan({"train": ("train", train), "val": (val_source, val), "test": (test_source, test)}, tuple(carved))


def given_stats(name: str, mean: Sequence[float] | None, std: Sequence[float] | None,
                channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The config's own channel statistics (both or neither), checked against the data's channel count."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise DataError(f"{name}: give both mean and std (per channel, in [0, 1] units), or neither")
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"{name}: mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
    if min(std) <= 0:
        raise DataError(f"{name}: std values must be > 0, got {list(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def build_splits(name: str, parts: dict[str, TensorSplit], plan: Plan, *, num_classes: int,
                 augment: Augment | ResizedCropFlip, classes: tuple[str, ...] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> DataSplits:
    """DataSplits of in-memory source splits (`parts`: "train" and optionally "val", "test") cut by `plan`."""
    train, val, test = (take(parts[source], idx) for source, idx in (plan.rows[s] for s in ("train", "val", "test")))
    check_labels(name, num_classes, train, val, test)
    channels = int(train.x.shape[1])
    stats = given_stats(name, mean, std, channels) or channel_stats(train.x)
    return DataSplits(name=name, train=train, val=val, test=test, num_classes=num_classes, in_channels=channels,
                      image_size=int(train.x.shape[-1]), mean=stats[0], std=stats[1], augment=augment,
                      classes=classes)
