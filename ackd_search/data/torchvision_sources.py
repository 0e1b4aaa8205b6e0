"""torchvision's own dataset classes by name (`torchvision:MNIST`, ...), read from their real on-disk files through
the classes themselves (downloaded by torchvision when allowed), minus md5 checks that reject small files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import KMNIST, MNIST, STL10, SVHN, USPS, FashionMNIST

from ackd_search.data.splits import TensorSplit
from ackd_search.errors import DataError, one_line


class _SVHNFiles(SVHN):
    def _check_integrity(self) -> bool:
        # torchvision compares the release's md5; existence is enough here (a broken file fails when read).
        return os.path.isfile(os.path.join(self.root, self.filename))


class _STL10Files(STL10):
    def _check_integrity(self) -> bool:
        # Only the labelled files this source reads, without md5 (torchvision also wants the 2.6 GB unlabelled set).
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name in _STL10_FILES)


_IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
_STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]


@dataclass(frozen=True)
class _Source:
    cls: type
    folder: Callable[[Path], Path]  # where torchvision keeps the files under data_root
    files: list[str]  # what must be there
    by_split: bool = False  # constructed with split="train"/"test" rather than train=True/False
    classes: tuple[str, ...] | None = None  # when the class carries none


_SOURCES: dict[str, _Source] = {
    "MNIST": _Source(MNIST, lambda r: r / "MNIST" / "raw", _IDX),
    "FashionMNIST": _Source(FashionMNIST, lambda r: r / "FashionMNIST" / "raw", _IDX),
    "KMNIST": _Source(KMNIST, lambda r: r / "KMNIST" / "raw", _IDX),
    "USPS": _Source(USPS, lambda r: r, ["usps.bz2", "usps.t.bz2"], classes=tuple(str(d) for d in range(10))),
    "SVHN": _Source(_SVHNFiles, lambda r: r, ["train_32x32.mat", "test_32x32.mat"], by_split=True,
                    classes=tuple(str(d) for d in range(10))),  # torchvision maps SVHN's label 10 to digit 0
    "STL10": _Source(_STL10Files, lambda r: r / "stl10_binary", _STL10_FILES, by_split=True),
}


def _make(source: _Source, root: Path, train: bool, download: bool) -> Any:
    if source.by_split:
        return source.cls(str(root), split="train" if train else "test", download=download)
    return source.cls(str(root), train=train, download=download)


def _to_split(dataset: Any) -> TensorSplit:
    data = dataset.data
    x = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if x.dim() == 3:
        x = x[:, None]  # grey (N, H, W)
    labels = dataset.targets if hasattr(dataset, "targets") else dataset.labels
    return TensorSplit(x=x.to(torch.uint8).contiguous(), y=torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def load_torchvision(class_name: str, root: Path,
                     download: bool) -> tuple[TensorSplit, TensorSplit, tuple[str, ...] | None]:
    """(train, test, class names) of torchvision dataset `class_name` under `root`."""
    name = f"torchvision:{class_name}"
    source = _SOURCES[class_name]
    folder = source.folder(root)
    missing = [f for f in source.files if not (folder / f).is_file()]
    if missing and not download:
        raise DataError(f"{name}: data not found in {folder} (expected {', '.join(source.files)}); download "
                        f"disabled (download=False)")
    try:
        train, test = (_make(source, root, flag, download=bool(missing)) for flag in (True, False))
        pool, held_out = _to_split(train), _to_split(test)
    except Exception as exc:
        why = f"download failed: {one_line(exc, 200)}" if missing else f"could not read it: {one_line(exc, 200)}"
        raise DataError(f"{name}: data in {folder} (expected {', '.join(source.files)}): {why}") from None
    names = getattr(train, "classes", None) or source.classes
    return pool, held_out, tuple(str(c) for c in names) if names else None
