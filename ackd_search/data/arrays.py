"""Data you bring as arrays: the `arrays` source (an .npz, or a folder of .npy files, named x_train / y_train / ...)
and the in-memory API `splits_from_arrays` / `splits_from_dataset`, checked with one-line errors naming file and key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ackd_search.data import images
from ackd_search.data.augment_policy import augment_for
from ackd_search.data.resized_crop import ResizedCropFlip
from ackd_search.data.splits import Augment, DataSplits, TensorSplit, build_splits, log, plan_splits
from ackd_search.errors import DataError, one_line

if TYPE_CHECKING:  # the config package imports the data package's names: no import cycle at run time
    from ackd_search.config import DataConfig

# One naming for both forms: the .npz key is the .npy file's stem. Images: uint8, N x H x W (grey), N x H x W x C
# (HWC, C = 1 or 3) or N x C x H x W (CHW, C = 1 or 3, recognised when the last axis is not 1 or 3); square.
# Labels: integers 0..K-1, K = num_classes when given, else the largest label + 1. Class names (optional): the .npz
# key "classes" (a string array) or classes.txt in the folder (one name a line).
ARRAY_NAMES = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
CLASSES_KEY, CLASSES_FILE = "classes", "classes.txt"
SPLITS = ("train", "val", "test")
Pair = tuple[Any, Any]  # (images, labels): numpy arrays or tensors


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """`x` as contiguous uint8 (N, C, H, W), by the layout rule above."""
    if x.dtype != np.uint8:
        hint = " (values in [0, 1]? use (x * 255).round().astype(np.uint8))" if x.dtype.kind == "f" else ""
        raise DataError(f"{where}: images have dtype {x.dtype}; expected uint8 (0..255){hint}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DataError(f"{where}: images have shape {tuple(x.shape)}; expected N x H x W, N x H x W x C or "
                        f"N x C x H x W with C = 1 or 3")
    if x.shape[0] == 0:
        raise DataError(f"{where}: holds no images")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"{where}: images are {x.shape[2]}x{x.shape[3]} (H x W); expected square images")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {y.dtype}; expected integers 0..K-1")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: {tuple(y.shape)} labels for {n} images; expected one label per image (N,)")
    if int(y.min()) < 0:
        raise DataError(f"{where}: label {int(y.min())} is negative; expected integers 0..K-1")
    return y.astype(np.int64)


def _num_classes(labels: dict[str, np.ndarray], where: dict[str, str], num_classes: int | None,
                 classes: Sequence[str] | None, name: str) -> int:
    top = max(int(y.max()) for y in labels.values())
    k = num_classes if num_classes is not None else len(classes) if classes is not None else top + 1
    for split, y in labels.items():
        if int(y.max()) >= k:
            given = "num_classes" if num_classes is not None else "the class names"
            raise DataError(f"{where[split]}: label {int(y.max())} is outside 0..{k - 1} ({given}: {k})")
    if classes is not None and len(classes) != k:
        raise DataError(f"{name}: {len(classes)} class names for {k} classes")
    if k < 2:
        raise DataError(f"{name}: every label is {top}; a classifier needs at least two classes")
    return k


def _assemble(name: str, data: dict[str, tuple[np.ndarray, np.ndarray]], where: dict[str, str], *,
              val_fraction: float, split_seed: int, limit: int | None, classes: Sequence[str] | None,
              num_classes: int | None, mean: Sequence[float] | None, std: Sequence[float] | None,
              augment: str | Augment | ResizedCropFlip) -> DataSplits:
    """DataSplits of checked (N, C, S, S) uint8 images and int64 labels per split."""
    shape = data["train"][0].shape[1:]
    for split, (x, _) in data.items():
        if x.shape[1:] != shape:
            raise DataError(f"{where[split]}: images are {'x'.join(map(str, x.shape[1:]))} (C x H x W) but the "
                            f"training images are {'x'.join(map(str, shape))}")
    k = _num_classes({s: y for s, (_, y) in data.items()}, where, num_classes, classes, name)
    parts = {s: TensorSplit(x=torch.from_numpy(x), y=torch.from_numpy(y)) for s, (x, y) in data.items()}
    plan = plan_splits(name, {s: data[s][1] if s in data else None for s in SPLITS}, val_fraction=val_fraction,
                       split_seed=split_seed, limit=limit)
    if plan.carved:
        log(f"{name}: {plan.note(val_fraction, split_seed)}")
    chosen = augment_for(name, int(shape[-1]), augment) if isinstance(augment, str) else augment
    return build_splits(name, parts, plan, num_classes=k, augment=chosen,
                        classes=tuple(str(c) for c in classes) if classes is not None else None, mean=mean, std=std)


def splits_from_arrays(train: Pair, val: Pair | None = None, test: Pair | None = None, *, name: str = "arrays",
                       val_fraction: float = 0.1, split_seed: int = 0, classes: Sequence[str] | None = None,
                       num_classes: int | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, augment: str | Augment | ResizedCropFlip = "auto",
                       limit: int | None = None, where: dict[str, str] | None = None) -> DataSplits:
    """DataSplits of in-memory (images, labels) pairs (numpy arrays or tensors, layouts as ARRAY_NAMES' comment);
    a missing val / test split is carved from train like every source. `where` names each array in errors."""
    where = {**{f"{p}_{s}": f"{name} {p}_{s}" for s in SPLITS for p in "xy"}, **(where or {})}
    data = {}
    for split, pair in (("train", train), ("val", val), ("test", test)):
        if pair is None:
            continue
        x = _images(_numpy(pair[0]), where[f"x_{split}"])
        data[split] = (x, _labels(_numpy(pair[1]), len(x), where[f"y_{split}"]))
    return _assemble(name, data, {s: where[f"y_{s}"] for s in data}, val_fraction=val_fraction,
                     split_seed=split_seed, limit=limit, classes=classes, num_classes=num_classes, mean=mean,
                     std=std, augment=augment)


def _item_image(image: Any, size: int | None, grey: bool | None, where: str) -> np.ndarray:
    """One dataset image as uint8 (C, H, W); `grey` None keeps grey images grey (the caller widens them)."""
    if not isinstance(image, Image.Image):
        array = _numpy(image)
        if array.dtype.kind == "f":  # ToTensor's [0, 1] floats
            array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise DataError(f"{where}: an image of dtype {array.dtype} and shape {array.shape}; expected a PIL image, "
                            f"a uint8 (C, H, W) / (H, W) tensor or a float one in [0, 1]")
        if array.ndim == 3:
            array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
        image = Image.fromarray(np.ascontiguousarray(array))
    keep_grey = image.mode in images.GREY_MODES if grey is None else grey
    return images.to_array(image, size, keep_grey)


def _dataset_arrays(dataset: Any, size: int | None, channels: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    grey = {"auto": None, "grey": True, "rgb": False}[channels]
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        xs.append(_item_image(item[0], size, grey, f"{where}[{i}]"))
        ys.append(int(item[1]))
    if not xs:
        raise DataError(f"{where}: the dataset is empty")
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        a = next(i for i, x in enumerate(xs) if x.shape[1:] != xs[0].shape[1:])
        raise DataError(f"{where}: images have different sizes ([0] {xs[0].shape[2]}x{xs[0].shape[1]}, [{a}] "
                        f"{xs[a].shape[2]}x{xs[a].shape[1]}); pass image_size=N to resize and centre-crop to N x N")
    if any(x.shape[0] == 3 for x in xs):  # not every image grey: grey ones widen as Pillow's L -> RGB does
        xs = [np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x for x in xs]
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def splits_from_dataset(train: Any, val: Any = None, test: Any = None, *, name: str = "dataset",
                        image_size: int | None = None, channels: str = "auto", val_fraction: float = 0.1,
                        split_seed: int = 0, classes: Sequence[str] | None = None, num_classes: int | None = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        augment: str | Augment | ResizedCropFlip = "auto", limit: int | None = None) -> DataSplits:
    """DataSplits of indexable datasets of (PIL image or image tensor, label), e.g. a torchvision dataset built
    without transforms: images follow the imagefolder colour and size rules (images.py), the rest is
    `splits_from_arrays`'s. Class names default to the training dataset's `classes` attribute."""
    if channels not in ("auto", "rgb", "grey"):
        raise DataError(f"unknown channels {channels!r}; allowed: auto, rgb, grey")
    given = {s: d for s, d in (("train", train), ("val", val), ("test", test)) if d is not None}
    data = {s: _dataset_arrays(d, image_size, channels, f"{name} {s}") for s, d in given.items()}
    if len({x.shape[1] for x, _ in data.values()}) > 1:  # grey train, colour val: every split widens to RGB
        data = {s: (np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x, y) for s, (x, y) in data.items()}
    for split, (x, _) in data.items():
        if x.shape[2] != x.shape[3]:
            raise DataError(f"{name} {split}: images are {x.shape[2]}x{x.shape[3]} (H x W); expected square images "
                            f"(pass image_size=N to resize and centre-crop to N x N)")
    names = classes if classes is not None else getattr(train, "classes", None)
    return _assemble(name, data, {s: f"{name} {s}" for s in data}, val_fraction=val_fraction, split_seed=split_seed,
                     limit=limit, classes=names, num_classes=num_classes, mean=mean, std=std, augment=augment)


def read_array_files(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None, dict[str, str]]:
    """(arrays by name, class names or None, where each array came from) of an .npz or a folder of .npy files."""
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise DataError(f"arrays: {path} not found (expected an .npz holding {', '.join(ARRAY_NAMES)} or a folder "
                        f"of {', '.join(n + '.npy' for n in ARRAY_NAMES)}; x_train and y_train are required)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            unknown = [k for k in keys if k not in ARRAY_NAMES + (CLASSES_KEY,)]
            if unknown:
                raise DataError(f"arrays: {path} holds unknown key {unknown[0]!r}; allowed: "
                                f"{', '.join(ARRAY_NAMES + (CLASSES_KEY,))}")
            arrays = {k: npz[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"arrays: could not read {path}: {one_line(exc, 200)}") from None
    classes = arrays.pop(CLASSES_KEY, None)
    if classes is not None and classes.dtype.kind not in "US":
        raise DataError(f"arrays: {path}[{CLASSES_KEY}] has dtype {classes.dtype}; expected strings")
    return arrays, None if classes is None else [str(c) for c in classes], {k: f"{path}[{k}]" for k in ARRAY_NAMES}


def _read_folder(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None, dict[str, str]]:
    unknown = sorted(p.name for p in path.glob("*.npy") if p.stem not in ARRAY_NAMES)
    if unknown:
        raise DataError(f"arrays: {path / unknown[0]} is not one of {', '.join(n + '.npy' for n in ARRAY_NAMES)}")
    arrays = {}
    for key in ARRAY_NAMES:
        file = path / f"{key}.npy"
        if file.is_file():
            try:
                arrays[key] = np.load(file, allow_pickle=False)
            except Exception as exc:
                raise DataError(f"arrays: could not read {file}: {one_line(exc, 200)}") from None
    names = path / CLASSES_FILE
    classes = [line.strip() for line in names.read_text().splitlines() if line.strip()] if names.is_file() else None
    return arrays, classes, {k: str(path / f"{k}.npy") for k in ARRAY_NAMES}


def load_arrays(cfg: DataConfig) -> DataSplits:
    """The `arrays` source: `cfg.data_root` is the .npz or the folder of .npy files."""
    path = Path(cfg.data_root).expanduser().resolve()
    arrays, classes, where = read_array_files(path)
    pairs: dict[str, Pair] = {}
    for split in SPLITS:
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if (x is None) != (y is None) or (split == "train" and x is None):
            missing = f"x_{split}" if x is None else f"y_{split}"
            raise DataError(f"arrays: {path} lacks {missing} (x_{split} and y_{split} come as a pair; x_train and "
                            f"y_train are required)")
        if x is not None:
            pairs[split] = (x, y)
    return splits_from_arrays(pairs["train"], pairs.get("val"), pairs.get("test"), name="arrays",
                              val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, classes=classes,
                              num_classes=cfg.num_classes, mean=cfg.mean, std=cfg.std, augment=cfg.augment,
                              limit=cfg.limit, where=where)
