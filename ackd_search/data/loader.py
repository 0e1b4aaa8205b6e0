"""DeviceLoader: batches a split on the device (or streams it there from host memory when it does not fit), crops,
flips and normalises it there, with each image's view id for the teacher-output cache; draws depend on (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ackd_search.data.resized_crop import ResizedCropFlip
from ackd_search.data.splits import Augment, TensorSplit
from ackd_search.errors import DataError

EPOCH_STRIDE = 100_003  # generator seed = seed * stride + epoch; prime, so (seed, epoch) pairs rarely collide
# Resident when the split's uint8 images take at most this share of the GPU's free memory at construction (the rest
# is the model's, the teacher-output cache's and the other loaders'); on the CPU always: there the images are already
# host memory (memory-mapped from the decode cache for an imagefolder) and batches are gathered from them either way.
RESIDENT_GPU_FRACTION = 0.5


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


def fits_device(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of images should live on `device` (RESIDENT_GPU_FRACTION of its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_GPU_FRACTION * free


def _active(augment: Augment | ResizedCropFlip | None) -> Augment | ResizedCropFlip | None:
    if isinstance(augment, Augment) and augment.pad == 0 and not augment.flip:
        return None
    return augment


class DeviceLoader:
    """Batches a TensorSplit for `device`; order and augmentation depend only on (seed, epoch).

    `resident` (None: `fits_device`): the images move to the device once and batches are gathered there; else they
    STREAM: each batch's rows are gathered on the host (a thread gathers the next batch meanwhile), pinned and copied
    with non_blocking=True, then augmented on the device exactly as a resident batch is, so both give equal batches.

    `iter_views()` yields the same batches with their VIEW IDS: image index * num_views + the view number of the
    crop and flip the image got (see `Augment`), so a cache of per-view outputs can be read for the batch;
    `epoch_views()` gives them all at once, in the epoch's order; a `ResizedCropFlip` has no enumerable views
    (num_views 1, and `iter_views` / `epoch_views` / `view_images` refuse)."""

    def __init__(self, split: TensorSplit, batch_size: int, device: torch.device | str,
                 mean: Sequence[float], std: Sequence[float], augment: Augment | ResizedCropFlip | None = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, resident: bool | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if split.x.dtype != torch.uint8:
            raise DataError(f"DeviceLoader expects uint8 images, got {split.x.dtype}")
        channels = split.x.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        nbytes = split.x.numel() * split.x.element_size()
        self.resident = fits_device(nbytes, self.device) if resident is None else resident
        # Resident: moved once, batches gathered on the device. Streaming: left in host memory (a memory-mapped
        # decode cache stays mapped), batches gathered there.
        self.x = split.x.to(self.device) if self.resident else split.x.cpu()
        self.y = split.y.to(self.device, dtype=torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.augment = _active(augment)
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

    def _host_draws(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        # A fresh CPU generator per epoch: identical draws on any device and regardless of what ran before,
        # which is what makes a resumed run bit-exact. The order of draws is today's for `Augment`.
        gen = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if self.augment is None:
            return order, ()
        if isinstance(self.augment, ResizedCropFlip):
            h, w = self.x.shape[-2:]
            return order, (self.augment.draw(n, h, w, gen),)
        offsets = torch.randint(0, 2 * self.augment.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        if not self.augment.flip:
            flips.zero_()
        return order, (offsets, flips)

    def _draws(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        order, draws = self._host_draws()
        return order, tuple(d.to(self.device) for d in draws)

    def _augmented(self, x: torch.Tensor, draws: tuple[torch.Tensor, ...], sl: slice) -> torch.Tensor:
        if self.augment is None:
            return x
        if isinstance(self.augment, ResizedCropFlip):
            return self.augment.apply(x, draws[0][sl])
        return crop_flip(x, self.augment.pad, draws[0][sl], draws[1][sl])

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as ToTensor + Normalize, so results match a torchvision pipeline.
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    def _to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned here, in the consuming thread: no CUDA call runs beside a CUDA-graph capture of the step.
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    def _streamed(self, order: torch.Tensor, slices: list[slice]) -> Iterator[torch.Tensor]:
        """The host rows of each slice of `order`, on the device; a thread gathers one batch ahead."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.x.index_select, 0, order[slices[0]]) if slices else None
            for i in range(len(slices)):
                rows = pending.result()
                if i + 1 < len(slices):
                    pending = pool.submit(self.x.index_select, 0, order[slices[i + 1]])
                yield self._to_device(rows)

    @property
    def num_views(self) -> int:
        """Distinct augmented views per image (1 without augmentation, and for a ResizedCropFlip)."""
        return self.augment.num_views if isinstance(self.augment, Augment) else 1

    def _check_views(self) -> None:
        if isinstance(self.augment, ResizedCropFlip):
            raise DataError(f"views of {self.augment!r} cannot be enumerated (no teacher-output cache for it)")

    def _batches(self, with_views: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        order, draws = self._draws()
        order_dev = order.to(self.device)
        slices = [slice(i * self.batch_size, (i + 1) * self.batch_size) for i in range(len(self))]
        if self.resident:
            rows = (self.x.index_select(0, order_dev[sl]) for sl in slices)  # 10x faster than x[idx] on a CPU
        else:
            rows = self._streamed(order, slices)
        for sl, x in zip(slices, rows):
            idx = order_dev[sl]
            x = self._augmented(x, draws, sl)
            if not with_views:
                yield self._normalize(x), self.y[idx]
                continue
            views = idx * self.num_views
            if self.augment is not None:
                views = views + self.augment.view_index(draws[0][sl], draws[1][sl])
            yield self._normalize(x), self.y[idx], views

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(with_views=False)  # type: ignore[return-value]

    def iter_views(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of `iter(self)` (same draws, same order) with each image's view id (int64, on the device)."""
        self._check_views()
        return self._batches(with_views=True)  # type: ignore[return-value]

    def epoch_views(self) -> torch.Tensor:
        """The view id of every image of this epoch in the epoch's order (int64, on the CPU): `iter_views`'s views
        of all batches, concatenated, known at the epoch's start, so a cache's rows can be gathered once per epoch
        (the batch at position p of the epoch reads row p of that gather)."""
        self._check_views()
        order, draws = self._host_draws()
        views = order * self.num_views
        if self.augment is not None:
            views = views + self.augment.view_index(*draws)
        return views

    def view_images(self, views: torch.Tensor) -> torch.Tensor:
        """The normalized augmented images of view ids `views` (any order): what a batch holding them yields."""
        self._check_views()
        views = views.to(self.device)
        idx = torch.div(views, self.num_views, rounding_mode="floor")
        x = self.x.index_select(0, idx) if self.resident else self._to_device(self.x.index_select(0, idx.cpu()))
        if self.augment is not None:
            offsets, flips = self.augment.decode(views % self.num_views)
            x = crop_flip(x, self.augment.pad, offsets, flips)
        return self._normalize(x)
