"""The teacher-output cache's arrays as one run reads them (`TeacherOutputs`), and what a process shares among its
trials: every `.npy` file memory-mapped once, and the device copy of an array kept for the next trial on that device.

Where a run's rows come from (`placement`):
- `device`: the whole arrays on the run's device (CUDA: when they take at most GPU_FRACTION of the GPU's free memory,
  `torch.cuda.mem_get_info()[0]`, at the run's start, or when this process already holds them there); a batch's rows
  are one index op on them, inside the captured graph.
- `epoch`: the arrays stay memory-mapped on the host; at each epoch's start the rows of that epoch (its order, crop
  offsets and flips are drawn at the start: `DeviceLoader.epoch_views`) are gathered on the host once and copied into
  a device buffer allocated once per run and filled in place, so a captured graph that indexes it stays valid; a
  batch reads it by its positions in the epoch. One host gather and one copy per epoch, none per step.
- `mapped` (a CPU run): the device is host memory: a batch's rows are gathered from the memory map directly.
The values a step receives are the same in every placement (the stored rows, as float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GPU_FRACTION = 0.25  # CUDA: the whole arrays go to the GPU when they take at most this share of its free memory
PLACEMENTS = ("auto", "device", "epoch", "mapped")
COPY_CHUNK_BYTES = 64 << 20  # a memory map goes to the device in chunks: never a host copy of a whole array

# Shared by the trials of one process. A file's mark (size, mtime_ns) tells a rebuilt file from the one mapped.
_MAPPED: dict[str, tuple[tuple[int, int], np.ndarray]] = {}
_ON_DEVICE: dict[tuple[str, str], tuple[tuple[int, int], torch.Tensor]] = {}  # (file, device) -> device copy


def _mark(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def mapped(path: Path) -> np.ndarray:
    """`path` (.npy) memory-mapped read-only, once per process (the page cache is shared with other processes)."""
    key, mark = str(path), _mark(path)
    hit = _MAPPED.get(key)
    if hit is None or hit[0] != mark:
        hit = _MAPPED[key] = (mark, np.load(path, mmap_mode="r"))
    return hit[1]


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    out = torch.empty(array.shape, dtype=_torch_dtype(array), device=device)
    step = max(1, COPY_CHUNK_BYTES // max(1, array[:1].nbytes))
    for lo in range(0, len(array), step):
        out[lo:lo + step].copy_(torch.from_numpy(np.array(array[lo:lo + step])))  # a chunk, copied: writable
    return out


def _shared_on_device(path: Path | None, array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The device copy of `array` (the contents of `path`), made once per process and device."""
    if path is None:
        return _to_device(array, device)
    key, mark = (str(path), str(device)), _mark(path)
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0] != mark:
        # Another cache on this device (another study, augmentation): its copies go, so memory stays bounded.
        for other in [k for k in _ON_DEVICE if k[1] == key[1] and Path(k[0]).parent != path.parent]:
            del _ON_DEVICE[other]
        hit = _ON_DEVICE[key] = (mark, _to_device(array, device))
    return hit[1]


def _held_on_device(path: Path | None, device: torch.device) -> bool:
    hit = _ON_DEVICE.get((str(path), str(device))) if path is not None else None
    return hit is not None and hit[0] == _mark(path)


def forget_shared() -> None:
    """Drop what this process shares among trials (tests; a caller that wants the memory back)."""
    _MAPPED.clear()
    _ON_DEVICE.clear()


class TeacherOutputs:
    """The cached arrays for one run. `rows(views, start)` is what a batch indexes them by (its view ids, or its
    positions in the epoch for `epoch`); `gather(rows)` gives (logits float32, pooled float32 or None) on `device`;
    `begin_epoch(loader)` is called before each epoch's first step. `in_graph`: `gather` is device index ops only,
    so a captured step runs it inside the graph.

    `arrays`: name -> (rows, width) array (a memory map or in memory); `files`: name -> the .npy it maps, what the
    process-level sharing is keyed by (None: an array of the caller's, not shared)."""

    def __init__(self, arrays: dict[str, np.ndarray], num_views: int, device: torch.device, directory: Path,
                 placement: str = "auto", files: dict[str, Path] | None = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
        self.arrays, self.num_views, self.device, self.directory = arrays, num_views, torch.device(device), directory
        self.files = files or {}
        self.has_pooled = "pooled" in arrays
        self.images = len(arrays["logits"]) // num_views
        self.placement = self._choose(placement)
        self.tensors: dict[str, torch.Tensor] = {}
        if self.placement == "device":
            self.tensors = {k: _shared_on_device(self.files.get(k), a, self.device) for k, a in arrays.items()}
        elif self.placement == "epoch":
            # Allocated once per run, for the most images an epoch can hold, and only ever filled in place.
            self.tensors = {k: torch.empty((self.images, a.shape[1]), dtype=_torch_dtype(a), device=self.device)
                            for k, a in arrays.items()}
            self.positions = torch.arange(self.images, device=self.device)
        self.in_graph = self.placement in ("device", "epoch")

    def _choose(self, placement: str) -> str:
        if placement != "auto":
            return placement
        if self.device.type != "cuda":
            return "mapped"
        if all(_held_on_device(self.files.get(k), self.device) for k in self.arrays):
            return "device"  # an earlier trial of this process put them there
        total = sum(a.nbytes for a in self.arrays.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        return "device" if total <= GPU_FRACTION * free else "epoch"

    def begin_epoch(self, loader) -> None:
        """`epoch`: gather this epoch's rows (host, from the memory maps) into the device buffers, in place."""
        if self.placement != "epoch":
            return
        views = loader.epoch_views().numpy()
        for name, array in self.arrays.items():
            self.tensors[name][:len(views)].copy_(torch.from_numpy(np.take(array, views, axis=0)))

    def rows(self, views: torch.Tensor, start: int) -> torch.Tensor:
        """What the batch at positions start.. of the epoch, with view ids `views`, indexes `gather` by."""
        if self.placement == "epoch":
            return self.positions[start:start + len(views)]  # a view of a tensor made once: no copy, no allocation
        return views

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.in_graph:
            out = [self.tensors[k].index_select(0, rows).float() for k in ("logits", "pooled") if k in self.tensors]
        else:
            idx = rows.cpu().numpy()  # a CPU run: no device to sync with
            out = [torch.from_numpy(np.take(self.arrays[k], idx, axis=0)).to(self.device).float()
                   for k in ("logits", "pooled") if k in self.arrays]
        return out[0], (out[1] if len(out) > 1 else None)


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype
