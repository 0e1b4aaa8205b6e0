"""CIFAR-10 / CIFAR-100 from their real on-disk layout (`cifar-*-python`) through torchvision's own classes, minus
the md5 comparison that rejects small files in the real format; downloaded by torchvision when allowed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from ackd_search.data.splits import TensorSplit
from ackd_search.errors import DataError, one_line

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
        raise _not_found(name, cls, folder, f"download failed: {one_line(exc, 200)}") from None


def _to_split(data: np.ndarray, targets: Sequence[int]) -> TensorSplit:
    x = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return TensorSplit(x=x, y=torch.as_tensor(np.asarray(targets), dtype=torch.int64))


def load_cifar(name: str, root: Path, download: bool) -> tuple[TensorSplit, TensorSplit]:
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
        raise DataError(f"{name}: could not read data in {folder}: {one_line(exc, 200)}") from None

