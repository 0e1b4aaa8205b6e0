"""Data layer: loads digits / CIFAR-10 / CIFAR-100 into uint8 tensor splits with a fixed validation split.

Also owns DeviceLoader, which keeps a split on the device and batches, augments and normalizes it there."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.datasets import CIFAR10, CIFAR100

DATASETS = ("digits", "cifar10", "cifar100")

# Fixed seeds: the digits test carve and the `limit` subsample must not move with split_seed,
# so every trial of a search sees the same pool.
_DIGITS_TEST_FRACTION = 0.2
_FIXED_SEED = 0
_EPOCH_STRIDE = 100_003  # generator seed = seed * stride + epoch; prime, so (seed, epoch) pairs rarely collide


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


class DataError(ValueError):
    """A user-facing data problem; the message is one line."""


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    augment: Augment


_SPECS = {
    "digits": _Spec(10, Augment(pad=1, flip=False)),  # digits are not mirror-invariant
    "cifar10": _Spec(10, Augment(pad=4, flip=True)),
    "cifar100": _Spec(100, Augment(pad=4, flip=True)),
}


# --- CIFAR through torchvision, minus the md5 comparison -------------------------------------------------------
# torchvision compares every file against the md5 of the official release, so small files in the real layout
# (tests, subsets) are rejected as "corrupted". A None md5 makes torchvision's check_integrity test existence only;
# the download archive keeps its md5 (tgz_md5), and a truncated file still fails when unpickled.


def _without_md5(files: list[list[str]]) -> list[list[Any]]:
    return [[name, None] for name, _ in files]


class _CIFAR10Files(CIFAR10):
    train_list: ClassVar[list[list[Any]]] = _without_md5(CIFAR10.train_list)
    test_list: ClassVar[list[list[Any]]] = _without_md5(CIFAR10.test_list)
    meta: ClassVar[dict[str, Any]] = {**CIFAR10.meta, "md5": None}

    @classmethod
    def expected_files(cls) -> list[str]:
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def _check_integrity(self) -> bool:
        # torchvision leaves meta out of this check; include it so a missing meta triggers a download too.
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in self.expected_files())


class _CIFAR100Files(_CIFAR10Files, CIFAR100):
    train_list: ClassVar[list[list[Any]]] = _without_md5(CIFAR100.train_list)
    test_list: ClassVar[list[list[Any]]] = _without_md5(CIFAR100.test_list)
    meta: ClassVar[dict[str, Any]] = {**CIFAR100.meta, "md5": None}


_CIFAR_CLASSES: dict[str, type[_CIFAR10Files]] = {"cifar10": _CIFAR10Files, "cifar100": _CIFAR100Files}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return reason[:200]


def _missing(cls: type[_CIFAR10Files], folder: Path) -> list[str]:
    return [name for name in cls.expected_files() if not (folder / name).is_file()]


def _not_found(name: str, cls: type[_CIFAR10Files], folder: Path, why: str) -> DataError:
    expected = ", ".join(cls.expected_files())
    return DataError(f"{name}: data not found in {folder} (expected {expected}); {why}")


def _download(name: str, cls: type[_CIFAR10Files], root: Path) -> None:
    folder = root / cls.base_folder
    archive = root / cls.filename
    created_root = not root.exists()
    had_archive = archive.exists()
    try:
        cls(str(root), train=False, download=True)  # torchvision's own download + extract path
    except Exception as exc:
        if not had_archive:
            archive.unlink(missing_ok=True)  # a partial download we caused would be mistaken for data later
        if created_root:
            try:
                os.rmdir(root)  # only if empty: never delete anything we did not create
            except OSError:
                pass
        raise _not_found(name, cls, folder, f"download failed: {_short(exc)}") from None


def _to_split(data: np.ndarray, targets: Sequence[int]) -> TensorSplit:
    x = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return TensorSplit(x=x, y=torch.as_tensor(np.asarray(targets), dtype=torch.int64))


def _load_cifar(name: str, root: Path, download: bool) -> tuple[TensorSplit, TensorSplit]:
    cls = _CIFAR_CLASSES[name]
    folder = root / cls.base_folder
    if _missing(cls, folder):
        if not download:
            raise _not_found(name, cls, folder, "download disabled (download=False)")
        _download(name, cls, root)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
        return _to_split(train.data, train.targets), _to_split(test.data, test.targets)
    except Exception as exc:
        raise DataError(f"{name}: could not read data in {folder}: {_short(exc)}") from None


# --- digits --------------------------------------------------------------------------------------------------------


def _load_digits() -> tuple[TensorSplit, TensorSplit]:
    bunch = load_digits()
    x = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255 (16*16 clips to 255)
    y = bunch.target.astype(np.int64)
    # No official test split: carve a fixed stratified one so results compare across runs.
    pool, test = train_test_split(
        np.arange(len(y)), test_size=_DIGITS_TEST_FRACTION, random_state=_FIXED_SEED, stratify=y
    )
    full = TensorSplit(torch.from_numpy(x), torch.from_numpy(y))
    return _take(full, np.sort(pool)), _take(full, np.sort(test))


# --- splitting and statistics ---------------------------------------------------------------------------------------


def _split_indices(y: np.ndarray, *, test_size: float | None = None, train_size: int | None = None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    try:
        a, b = train_test_split(idx, test_size=test_size, train_size=train_size, random_state=seed, stratify=y)
    except ValueError:
        # Too few samples for every class to appear on both sides (tiny `limit`s): an unstratified split,
        # still fixed by the seed, beats refusing a smoke run.
        a, b = train_test_split(idx, test_size=test_size, train_size=train_size, random_state=seed)
    return np.sort(a), np.sort(b)  # keep the original order inside each side


def _take(split: TensorSplit, idx: np.ndarray) -> TensorSplit:
    index = torch.from_numpy(idx)
    return TensorSplit(x=split.x[index].contiguous(), y=split.y[index].contiguous())


def _cap(split: TensorSplit, limit: int | None) -> TensorSplit:
    if limit is None or len(split) <= limit:
        return split
    kept, _ = _split_indices(split.y.numpy(), train_size=limit, seed=_FIXED_SEED)
    return _take(split, kept)


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


def _check_args(name: str, val_fraction: float, limit: int | None) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if limit is not None and limit < 2:
        raise DataError(f"limit must be an integer >= 2 (or None), got {limit}")


def _check_labels(name: str, num_classes: int, *splits: TensorSplit) -> None:
    # Hand-made files with wrong labels would otherwise surface later as a CUDA assert in the loss.
    for split in splits:
        if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= num_classes):
            raise DataError(f"{name}: labels outside 0..{num_classes - 1} in the data files")


def load_splits(name: str, data_root: str | Path = "data", val_fraction: float = 0.1,
                split_seed: int = 0, download: bool = True, limit: int | None = None) -> DataSplits:
    """Load `name` as uint8 train/val/test splits; val is a stratified split of the training data (split_seed)."""
    _check_args(name, val_fraction, limit)
    if name == "digits":
        pool, test = _load_digits()
    else:
        pool, test = _load_cifar(name, Path(data_root).expanduser().resolve(), download)
    pool, test = _cap(pool, limit), _cap(test, limit)
    spec = _SPECS[name]
    _check_labels(name, spec.num_classes, pool, test)
    train_idx, val_idx = _split_indices(pool.y.numpy(), test_size=val_fraction, seed=split_seed)
    train, val = _take(pool, train_idx), _take(pool, val_idx)
    mean, std = channel_stats(train.x)
    return DataSplits(name=name, train=train, val=val, test=test, num_classes=spec.num_classes,
                      in_channels=int(train.x.shape[1]), image_size=int(train.x.shape[-1]),
                      mean=mean, std=std, augment=spec.augment)


# --- device-resident loader -----------------------------------------------------------------------------------------


def crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random-crop with zero padding, then horizontal flip, for a whole batch in one gather.

    offsets: (B, 2) int64 (row, col) crop origins in [0, 2*pad]; flip: (B,) bool. Same semantics as torchvision's
    RandomCrop(padding=pad) followed by RandomHorizontalFlip: padding is raw 0 (black) before normalization."""
    b, c, h, w = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + offsets[:, 1:]  # flip the crop window, not the pad
    return x[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class DeviceLoader:
    """Batches a TensorSplit that lives on `device`; order and augmentation depend only on (seed, epoch).

    `iter_views()` yields the same batches with their VIEW IDS: image index * num_views + the view number of the
    crop and flip the image got (see `Augment`), so a cache of per-view outputs can be read for the batch."""

    def __init__(self, split: TensorSplit, batch_size: int, device: torch.device | str,
                 mean: Sequence[float], std: Sequence[float], augment: Augment | None = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if split.x.dtype != torch.uint8:
            raise DataError(f"DeviceLoader expects uint8 images, got {split.x.dtype}")
        channels = split.x.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        self.x = split.x.to(self.device)  # moved once; batches are gathered on the device
        self.y = split.y.to(self.device, dtype=torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.augment = augment if augment and (augment.pad > 0 or augment.flip) else None
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.dtype = dtype
        self.num_samples = int(self.y.shape[0])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _draws(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # A fresh CPU generator per epoch: identical draws on any device and regardless of what ran before,
        # which is what makes a resumed run bit-exact.
        gen = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.augment is None:
            return order.to(self.device), None, None
        offsets = torch.randint(0, 2 * self.augment.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        if not self.augment.flip:
            flips.zero_()
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as ToTensor + Normalize, so results match a torchvision pipeline.
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    @property
    def num_views(self) -> int:
        """Distinct augmented views per image (1 without augmentation)."""
        return self.augment.num_views if self.augment is not None else 1

    def _batches(self, with_views: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        order, offsets, flips = self._draws()
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            x = self.x[idx]
            if self.augment is not None:
                x = crop_flip(x, self.augment.pad, offsets[sl], flips[sl])
            if not with_views:
                yield self._normalize(x), self.y[idx]
                continue
            views = idx * self.num_views
            if self.augment is not None:
                views = views + self.augment.view_index(offsets[sl], flips[sl])
            yield self._normalize(x), self.y[idx], views

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(with_views=False)  # type: ignore[return-value]

    def iter_views(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of `iter(self)` (same draws, same order) with each image's view id (int64, on the device)."""
        return self._batches(with_views=True)  # type: ignore[return-value]

    def view_images(self, views: torch.Tensor) -> torch.Tensor:
        """The normalized augmented images of view ids `views` (any order): what a batch holding them yields."""
        views = views.to(self.device)
        idx = torch.div(views, self.num_views, rounding_mode="floor")
        x = self.x[idx]
        if self.augment is not None:
            offsets, flips = self.augment.decode(views % self.num_views)
            x = crop_flip(x, self.augment.pad, offsets, flips)
        return self._normalize(x)
