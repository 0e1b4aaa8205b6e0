"""The data every trial shares: uint8 tensor splits (train / val / test) with the data set's augmentation and
channel statistics, and the fixed, stratified splitting and subsampling that keep one validation set per search."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from ackd_search.errors import DataError
from sklearn.model_selection import train_test_split

FIXED_SEED = 0  # the digits test carve and the `limit` subsample must not move with split_seed


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
    augment: Augment  # the data set's standard training augmentation


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


def cap(split: TensorSplit, limit: int | None) -> TensorSplit:
    if limit is None or len(split) <= limit:
        return split
    kept, _ = split_indices(split.y.numpy(), train_size=limit, seed=FIXED_SEED)
    return take(split, kept)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 (N, C, H, W) tensor, in [0,1] units.

    A 256-bin histogram per channel is exact and avoids a float copy of the whole split."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum().clamp_min(1.0)
        mean = float((counts * values).sum() / total)
        var = float((counts * values.square()).sum() / total) - mean * mean
        means.append(mean)
        stds.append(max(math.sqrt(max(var, 0.0)), 1e-6))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)



def check_labels(name: str, num_classes: int, *splits: TensorSplit) -> None:
    # Hand-made files with wrong labels would otherwise surface later as a CUDA assert in the loss.
    for split in splits:
        if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
            raise DataError(f"{name}: labels outside 0..{num_classes - 1} in the data files")

