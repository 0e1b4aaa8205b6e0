"""The ImageFolder layout, read without decoding: ROOT/train/<class>/<image> (and ROOT/val, ROOT/test when present),
the class list every split shares, each file's size and mtime, and one-line errors for every broken layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ackd_search.data.images import image_extensions, is_image_file
from ackd_search.errors import DataError

SPLIT_FOLDERS = ("train", "val", "test")
LAYOUT = "ROOT/train/<class>/<image>, optionally ROOT/val/<class>/... and ROOT/test/<class>/..."


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the root, '/'-separated
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Listing:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, list[Entry]]  # the split folders present ("train" always), files in torchvision's order


def _fail(text: str) -> DataError:
    return DataError(f"imagefolder: {text}")


def _extensions_text() -> str:
    common = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"]
    return ", ".join(e for e in common if e in image_extensions()) + ", ... (any format Pillow reads)"


def _class_dirs(folder: Path) -> list[str]:
    # torchvision's find_classes sorts every sub-folder; hidden ones (.ipynb_checkpoints, .git) are left out here.
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise _fail(f"cannot read {folder}: {exc.strerror or exc}") from None
    if not entries:
        raise _fail(f"{folder} is empty (expected one folder per class holding its images: {LAYOUT})")
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        files = sum(1 for e in entries if e.is_file())
        raise _fail(f"{folder} holds no class folders, only {files} file(s) (expected {LAYOUT})")
    return names


def _files(class_dir: Path, root: Path, label: int) -> list[Entry]:
    # torchvision's make_dataset order: sorted os.walk (following links), names sorted within each folder.
    out = []
    for here, _, names in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(names):
            if not is_image_file(name):
                continue
            path = Path(here, name)
            stat = path.stat()
            out.append(Entry(path.relative_to(root).as_posix(), label, stat.st_size, stat.st_mtime_ns))
    if not out:
        raise _fail(f"class folder {class_dir} holds no image files ({_extensions_text()})")
    return out


def _same_classes(train: Path, other: Path, classes: list[str], found: list[str]) -> None:
    missing = [c for c in classes if c not in found]
    if missing:
        raise _fail(f"class {missing[0]!r} of {train} is missing from {other}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; every split needs the same "
                    f"class folders")
    extra = [c for c in found if c not in classes]
    if extra:
        raise _fail(f"{other} has class folder {extra[0]!r} that {train} lacks; every split needs the same class "
                    f"folders")


def scan(root: Path) -> Listing:
    """The layout under `root`, checked: classes, files per split, sizes and mtimes (nothing is decoded)."""
    if not root.is_dir():
        raise _fail(f"{root} {'is not a folder' if root.exists() else 'not found'} (expected {LAYOUT})")
    train = root / "train"
    if not train.is_dir():
        subs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = f"; found folders {', '.join(subs[:4])}: if these are the classes, move them into {train}"
        raise _fail(f"no train folder in {root} (expected {LAYOUT}){hint if subs else ''}")
    classes = _class_dirs(train)
    if len(classes) < 2:
        raise _fail(f"{train} has one class folder ({classes[0]}); a classifier needs at least two")
    splits = {"train": [e for i, c in enumerate(classes) for e in _files(train / c, root, i)]}
    for name in SPLIT_FOLDERS[1:]:
        folder = root / name
        if not folder.is_dir():
            continue
        _same_classes(train, folder, classes, _class_dirs(folder))
        splits[name] = [e for i, c in enumerate(classes) for e in _files(folder / c, root, i)]
    return Listing(root=root, classes=tuple(classes), splits=splits)
