"""Decoded once per study: an ImageFolder's images as uint8 .npy arrays beside the teacher cache, built under a
cross-process lock, checksummed in a manifest written last, and read memory-mapped by every trial and worker."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ackd_search.data import images
from ackd_search.data.folder_scan import Entry
from ackd_search.data.splits import TensorSplit, log, stats_from_counts
from ackd_search.errors import DataError, one_line
from ackd_search.files import locked, mark_verified, matches_sha256, sha256_file, temporary_name, write_text_atomic

# Layout: `<cache_dir>/imagefolder-<sha16 of key>/` holds `{train,val,test}_x.npy` (N, C, S, S) uint8 and
# `{train,val,test}_y.npy` int64, rows in the file order of each split, and `manifest.json` (key, classes, channel
# statistics of train, skipped files, each array's sha256); the lock is `<entry>.lock`. The key is the selected file
# list of every split (relative path, label, size, mtime_ns: so carving and `limit` are in it), the class names, the
# resolution, the channel rule and RULES_VERSION / FORMAT_VERSION.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_UNREADABLE_FRACTION = 0.01  # more unreadable files than this share (and more than one) refuses the folder
DECODE_THREADS = min(8, os.cpu_count() or 1)  # Pillow releases the GIL while decoding and resizing
BLOCK = 256  # files handed to the decoding threads at a time
PROGRESS_EVERY_S = 30.0
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[Entry]]  # split -> the files it takes (after carving and `limit`)
    image_size: int | None
    channels: str  # auto | rgb | grey
    note: str = ""  # how val / test were made, for the log line


def cache_key(req: Request) -> dict[str, Any]:
    files = {}
    for split in SPLITS:
        digest = hashlib.sha256()
        for e in req.files[split]:
            digest.update(f"{e.rel}\t{e.label}\t{e.size}\t{e.mtime_ns}\n".encode())
        files[split] = {"count": len(req.files[split]), "sha256": digest.hexdigest()}
    return {"format": FORMAT_VERSION, "rules": images.RULES_VERSION, "source": "imagefolder",
            "classes": list(req.classes), "files": files, "image_size": req.image_size, "channels": req.channels}


def entry_dir(cache_dir: Path, key: dict[str, Any]) -> Path:
    return cache_dir / f"imagefolder-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"




def read_manifest(directory: Path, key: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when the entry is complete and every array matches its hash; (None, None) when there is no
    entry yet; (None, why) when there is one but it is corrupt."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None, f"decode cache {path} is unreadable (corrupt)"
    if manifest.get("key") != key:
        return None, f"decode cache {path} belongs to another key (corrupt)"
    arrays = manifest.get("arrays", {})
    if set(arrays) != {f"{split}_{part}.npy" for split in SPLITS for part in "xy"}:
        return None, f"decode cache {path} does not list every array (corrupt)"
    for name, meta in arrays.items():
        file = directory / name
        if not file.is_file():
            return None, f"decode cache {file} is missing"
        if not matches_sha256(file, meta.get("sha256")):
            return None, f"decode cache {file} does not match its manifest's sha256 (corrupt)"
    return manifest, None


def _threaded(fn: Callable[[Entry], T], entries: Sequence[Entry], what: str) -> Iterator[T]:
    """fn over entries in order, DECODE_THREADS at a time, with a progress line every PROGRESS_EVERY_S."""
    start = last = time.perf_counter()
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for lo in range(0, len(entries), BLOCK):
            yield from pool.map(fn, entries[lo:lo + BLOCK])
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                done = min(len(entries), lo + BLOCK)
                log(f"{what}: {done:,}/{len(entries):,} images, {now - start:.0f} s")


def _header(root: Path) -> Callable[[Entry], tuple[str, tuple[int, int]] | str]:
    def read(e: Entry) -> tuple[str, tuple[int, int]] | str:
        try:
            return images.header(root / e.rel)
        except Exception as exc:  # any reason Pillow cannot open it makes the file unreadable
            return one_line(exc, 120)
    return read


def _decoder(root: Path, size: int | None, grey: bool) -> Callable[[Entry], np.ndarray | str]:
    def read(e: Entry) -> np.ndarray | str:
        try:
            return images.decode(root / e.rel, size, grey)
        except Exception as exc:  # truncated or corrupt pixel data
            return one_line(exc, 120)
    return read


class _Skipped:
    """Unreadable files: dropped from their split, named in one line, refused past MAX_UNREADABLE_FRACTION."""

    def __init__(self, root: Path, total: int):
        self.root, self.total, self.files = root, total, []

    def add(self, e: Entry, why: str) -> None:
        self.files.append({"file": e.rel, "why": why})

    def text(self) -> str:
        first = ", ".join(f"{self.root / f['file']} ({f['why']})" for f in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"{len(self.files)} unreadable image(s) of {self.total:,}: {first}{more}"

    def check(self) -> None:
        allowed = max(1, int(MAX_UNREADABLE_FRACTION * self.total))
        rule = f"at most {MAX_UNREADABLE_FRACTION:.0%} of the images (or one) may be unreadable and are skipped"
        if len(self.files) > allowed:
            raise DataError(f"imagefolder: {self.text()}; refusing the folder ({rule}): fix or remove them")


def _plan_shape(req: Request, headers: dict[str, list[Any]]) -> tuple[bool, int]:
    """(grey, side) of the decoded arrays, from the readable files' headers."""
    good = [(e, h) for split in SPLITS for e, h in zip(req.files[split], headers[split]) if not isinstance(h, str)]
    grey = req.channels == "grey" or (req.channels == "auto" and all(h[0] in images.GREY_MODES for _, h in good))
    if req.image_size is not None:
        return grey, req.image_size
    if not good:
        raise DataError(f"imagefolder: no readable images in {req.root}")
    first, (_, size) = good[0]
    other = next(((e, h[1]) for e, h in good if h[1] != size), None)
    fix = "set data.image_size: N to resize every image's shorter side to N and centre-crop it to N x N"
    if other is not None:
        raise DataError(f"imagefolder: images in {req.root} have different sizes ({first.rel} {size[0]}x{size[1]}, "
                        f"{other[0].rel} {other[1][0]}x{other[1][1]}); {fix}")
    if size[0] != size[1]:
        raise DataError(f"imagefolder: images in {req.root} are {size[0]}x{size[1]}, not square; {fix}")
    return grey, size[0]


def _decode_split(req: Request, split: str, entries: list[Entry], grey: bool, side: int, directory: Path,
                  skipped: _Skipped, counts: np.ndarray | None) -> dict[str, dict[str, Any]]:
    """Decode `entries` into `<split>_x.npy` / `<split>_y.npy`; files failing to decode are skipped."""
    if not entries:
        raise DataError(f"imagefolder: no readable images left in the {split} split of {req.root}")
    x_path = directory / f"{split}_x.npy"
    tmp = temporary_name(x_path)
    try:
        return _write_split(req, split, entries, (1 if grey else 3, side), skipped, counts, x_path, tmp)
    finally:  # a refused or failed decode leaves no temporary file behind
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + "c").unlink(missing_ok=True)


def _write_split(req: Request, split: str, entries: list[Entry], shape: tuple[int, int], skipped: _Skipped,
                 counts: np.ndarray | None, x_path: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    channels, side = shape
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), channels, side, side))
    kept = []
    decoded_images = _threaded(_decoder(req.root, req.image_size, channels == 1), entries, f"decoding {split}")
    for e, image in zip(entries, decoded_images):
        if isinstance(image, str):
            skipped.add(e, image)
            continue
        x[len(kept)] = image
        kept.append(e)
        if counts is not None:
            for c in range(channels):
                counts[c] += np.bincount(image[c].ravel(), minlength=256)
    x.flush()
    del x
    if not kept:
        raise DataError(f"imagefolder: no readable images left in the {split} split of {req.root}")
    if len(kept) < len(entries):  # rare: drop the rows of files that opened but failed to decode
        full = np.load(tmp, mmap_mode="r")
        compact = tmp.with_name(tmp.name + "c")
        out = np.lib.format.open_memmap(compact, mode="w+", dtype=np.uint8, shape=(len(kept),) + full.shape[1:])
        out[:] = full[:len(kept)]
        out.flush()
        del out, full
        os.replace(compact, tmp)
    os.replace(tmp, x_path)
    y_path = x_path.with_name(f"{split}_y.npy")
    y_tmp = temporary_name(y_path)
    with open(y_tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.array([e.label for e in kept], dtype=np.int64))
    os.replace(y_tmp, y_path)
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in (x_path, y_path)}


def build(req: Request, key: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Decode every split into `directory`; the manifest is written last, so a crash leaves no entry."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # what follows replaces the arrays: never a stale manifest
    started = time.perf_counter()
    total = sum(len(req.files[s]) for s in SPLITS)
    skipped = _Skipped(req.root, total)
    headers = {s: list(_threaded(_header(req.root), req.files[s], f"reading headers of {s}")) for s in SPLITS}
    readable: dict[str, list[Entry]] = {}
    for split in SPLITS:
        readable[split] = []
        for e, h in zip(req.files[split], headers[split]):
            if isinstance(h, str):
                skipped.add(e, h)
            else:
                readable[split].append(e)
    skipped.check()
    grey, side = _plan_shape(req, headers)
    channels = 1 if grey else 3
    counts = np.zeros((channels, 256), dtype=np.int64)
    arrays: dict[str, dict[str, Any]] = {}
    sizes = {}
    for split in SPLITS:
        before = len(skipped.files)
        arrays.update(_decode_split(req, split, readable[split], grey, side, directory, skipped,
                                    counts if split == "train" else None))
        sizes[split] = len(readable[split]) - (len(skipped.files) - before)
        skipped.check()
    labels = np.load(directory / "train_y.npy")
    empty = [c for i, c in enumerate(req.classes) if not (labels == i).any()]
    if empty:
        raise DataError(f"imagefolder: class {empty[0]!r} has no readable training images in {req.root}")
    mean, std = stats_from_counts(torch.from_numpy(counts))
    manifest = {"key": key, "root": str(req.root), "classes": list(req.classes), "channels": channels,
                "image_size": side, "images": sizes, "mean": list(mean), "std": list(std),
                "skipped": {"count": len(skipped.files), "files": skipped.files[:100]}, "arrays": arrays,
                "decode_s": round(time.perf_counter() - started, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "pid": os.getpid()}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))
    for name in arrays:  # just hashed: this process need not hash them again
        mark_verified(directory / name)
    if skipped.files:
        log(f"skipped {skipped.text()} in {req.root} (at most {MAX_UNREADABLE_FRACTION:.0%} or one may be)")
    return manifest


def _describe(manifest: dict[str, Any]) -> str:
    colour = "grey" if manifest["channels"] == 1 else "RGB"
    side = manifest["image_size"]
    return f"{sum(manifest['images'].values()):,} images of {manifest['root']} ({len(manifest['classes'])} classes, " \
           f"{side}x{side} {colour})"


def _open(directory: Path) -> dict[str, TensorSplit]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for split in SPLITS:
            # Copy-on-write mapping: pages are shared with every process reading the file, like mode "r", but an
            # in-place op on the tensor (torch ignores numpy's read-only flag) cannot crash the process.
            x = np.load(directory / f"{split}_x.npy", mmap_mode="c")
            y = np.load(directory / f"{split}_y.npy")
            out[split] = TensorSplit(x=torch.from_numpy(x), y=torch.from_numpy(y))
    return out


def decoded(req: Request, cache_dir: Path) -> tuple[dict[str, TensorSplit], dict[str, Any]]:
    """The splits of `req`, decoded now when no process has yet (then logged once), else read from the cache."""
    key = cache_key(req)
    directory = entry_dir(cache_dir, key)
    note = f"; {req.note}" if req.note else ""
    manifest, _ = read_manifest(directory, key)
    if manifest is None:
        try:
            with locked(directory.with_suffix(".lock")):
                manifest, problem = read_manifest(directory, key)
                if manifest is None:
                    if problem:
                        log(f"{problem}; decoding again")
                    manifest = build(req, key, directory)
                    log(f"decoded {_describe(manifest)} in {manifest['decode_s']:.1f} s into {directory}{note}")
                    return _open(directory), manifest
        except OSError as exc:
            raise DataError(f"imagefolder: cannot write the decode cache in {cache_dir}: {one_line(exc)}") from None
    skipped = manifest["skipped"]["count"]
    also = f", {skipped} unreadable file(s) skipped when decoded" if skipped else ""
    log(f"read {_describe(manifest)} from {directory}, memory-mapped{also}{note}")
    return _open(directory), manifest
