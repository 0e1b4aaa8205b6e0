"""DeviceLoader: keeps a split on the device and batches, crops, flips and normalises it there, with each image's
view id for the teacher-output cache; order and augmentation depend only on (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from ackd_search.data.splits import Augment, TensorSplit
from ackd_search.errors import DataError

EPOCH_STRIDE = 100_003  # generator seed = seed * stride + epoch; prime, so (seed, epoch) pairs rarely collide


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
        gen = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch)
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

