"""The teacher's outputs, computed once per study: logits (and pooled features where ACKD needs them) for every
augmented VIEW of every training image, stored beside the cached teacher and read by every trial and worker.

With the standard augmentation (crop from the image padded by `pad`, horizontal flip) an image has
(2 pad + 1)^2 x 2 views (CIFAR: 162; digits, pad 1 and no flip: 9); `DeviceLoader.iter_views` tells which view each
image of a batch is, and the trainer gathers that view's row here instead of running the frozen teacher.

Storage, in `<teacher cache entry>/outputs/<key>/` (a user's checkpoint: `<cache_dir>/checkpoint-<sha>/outputs/`):
`logits.npy` (and `pooled.npy`), shape (images x views, width), row = image * num_views + view; float32 when the
float32 array is at most STORE_F32_MAX_BYTES (digits, small subsets), else float16 (CIFAR-10 0.15 GB, CIFAR-100
1.5 GB); `manifest.json` (rewritten last, atomically) names the arrays it holds, with their shapes, dtypes and
sha256. The key hashes the teacher's weights (sha256), the training split's images and labels, the augmentation and
the teacher's precision, not which arrays a run needs: a run that needs an array the entry lacks (ACKD's pooled
features after KD's logits) computes that array alone and adds it to the manifest. The first process computes
under the teacher cache's lock; the others wait and read it. A process maps each file once and its trials share the
map (and the arrays' device copy: `teacher_outputs.py`, which also says where a run reads its rows from).

`teacher.output_cache`: off; on; auto = on when the arrays (as stored) take at most HOST_MEMORY_FRACTION of this
machine's memory (they are memory-mapped and read every epoch: they must stay in the page cache) and, on a CPU,
computing the cache costs no more teacher forwards than this run would spend itself (views <= images x epochs): on
a GPU a study's trials share it, on a CPU a single trial must not pay for a long precomputation. The GPU's memory
decides only where the rows are read from (`teacher_outputs.GPU_FRACTION`), never whether the cache is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ackd_search.config import RunConfig
from ackd_search.data import Augment, DataSplits, DeviceLoader
from ackd_search.files import locked, mark_verified, matches_sha256, sha256_file, write_text_atomic
from ackd_search.notices import notice
from ackd_search.training.device import autocast_for
from ackd_search.training.teacher_outputs import GPU_FRACTION, TeacherOutputs, mapped
from ackd_search.training.teachers import cache_entry

__all__ = ["GPU_FRACTION", "HOST_MEMORY_FRACTION", "TeacherOutputs", "teacher_outputs_for"]

HOST_MEMORY_FRACTION = 0.5  # auto: the arrays (as stored) must fit this share of the host's physical memory
STORE_F32_MAX_BYTES = 64 << 20  # float32 storage up to this size, float16 beyond
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_EVERY_S = 5.0


def _log(text: str, once: bool = False) -> None:
    notice(f"teacher output cache: {text}", once=once)


def needs_pooled(cfg: RunConfig) -> bool:
    """Whether the run's distiller reads the teacher's pooled features (ACKD, adversary on features vs teacher)."""
    ackd = cfg.distill.ackd
    return (cfg.distill.method == "ackd" and ackd.adv_weight > 0 and ackd.adv_input == "features"
            and ackd.adv_real == "teacher")


def enumerable(augment: Any) -> str | None:
    """None when the cache can enumerate every view `augment` produces, else why not (one line)."""
    if augment is None or type(augment) is Augment:
        return None
    return f"augmentation {type(augment).__name__} {augment!r} has views the cache cannot enumerate"


def _storage_dtype(nbytes_f32: int) -> np.dtype:
    return np.dtype(np.float32) if nbytes_f32 <= STORE_F32_MAX_BYTES else np.dtype(np.float16)


@dataclass
class Plan:
    rows: int  # images x views
    num_views: int
    widths: dict[str, int]  # array name -> width
    precision: str

    def nbytes(self) -> int:
        return sum(self.rows * w * _storage_dtype(self.rows * w * 4).itemsize for w in self.widths.values())


def _fingerprint(splits: DataSplits) -> str:
    digest = hashlib.sha256()
    digest.update(splits.train.x.contiguous().numpy())  # the buffer itself: no copy of a large split
    digest.update(splits.train.y.contiguous().numpy())
    return digest.hexdigest()


def cache_key(cfg: RunConfig, splits: DataSplits, teacher_info: dict[str, Any], precision: str) -> dict[str, Any]:
    aug = splits.augment
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_info.get("sha256"),
        "teacher_arch": cfg.teacher.arch,
        "data": {"name": splits.name, "train_sha256": _fingerprint(splits), "images": len(splits.train),
                 "mean": list(splits.mean), "std": list(splits.std)},
        "augment": {"pad": aug.pad, "flip": aug.flip} if aug is not None else None,
        "precision": precision,
    }


def cache_dir(cfg: RunConfig, teacher_info: dict[str, Any], key: dict[str, Any]) -> Path:
    base = Path(teacher_info.get("cache_entry") or teacher_info.get("given_dir") or cache_entry(cfg))
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return base / "outputs" / name


def _lock_path(cfg: RunConfig, directory: Path) -> Path:
    # The teacher cache's own lock for a cached teacher (so training it and computing its outputs serialise).
    return directory.parent.parent.with_suffix(".lock")




def read_manifest(directory: Path, key: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """The manifest when it is complete, for `key`, holds every array in `names` and each matches its hash."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("key") != key:
        return None
    arrays = manifest.get("arrays", {})
    for name in names:
        meta = arrays.get(name)
        file = directory / f"{name}.npy"
        if meta is None or not file.is_file() or not matches_sha256(file, meta.get("sha256")):
            return None
    return manifest


@torch.no_grad()
def compute(teacher: nn.Module, loader: DeviceLoader, names: list[str], directory: Path, autocast,
            chunk: int) -> dict[str, dict[str, Any]]:
    """Run `teacher` over every view of `loader`'s images, in chunks of `chunk` views, writing `<name>.npy` for each
    of `names` only (pooled alone, when the logits are there already)."""
    rows = loader.num_samples * loader.num_views
    outs: dict[str, np.ndarray] = {}
    tmp: dict[str, Path] = {}
    start = last = time.perf_counter()
    for lo in range(0, rows, chunk):
        views = torch.arange(lo, min(rows, lo + chunk), device=loader.device)
        x = loader.view_images(views)
        with autocast():
            if "pooled" in names:
                pooled = teacher.head.pooled(teacher.forward_features(x))
                got = {"pooled": pooled, **({"logits": teacher.head.fc(pooled)} if "logits" in names else {})}
            else:
                got = {"logits": teacher(x)}
        for name, value in got.items():
            value = value.float().cpu().numpy()
            if name not in outs:
                width = value.shape[1]
                tmp[name] = directory / f"{name}.npy.tmp{os.getpid()}"
                outs[name] = np.lib.format.open_memmap(tmp[name], mode="w+", shape=(rows, width),
                                                       dtype=_storage_dtype(rows * width * 4))
            outs[name][lo:lo + len(value)] = value
        now = time.perf_counter()
        done = min(rows, lo + chunk)
        if now - last >= PROGRESS_EVERY_S or done == rows:
            last = now
            _log(f"{done:,}/{rows:,} {'+'.join(names)} views ({100 * done / rows:.0f}%), {now - start:.1f} s")
    meta = {}
    for name in list(outs):
        array = outs.pop(name)
        array.flush()
        dtype, shape = str(array.dtype), list(array.shape)
        del array
        final = directory / f"{name}.npy"
        os.replace(tmp[name], final)
        meta[name] = {"file": final.name, "sha256": sha256_file(final), "dtype": dtype, "shape": shape}
        mark_verified(final)  # just hashed: this process's trials need not read it again
    return meta


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _decide(cfg: RunConfig, splits: DataSplits, device: torch.device, plan: Plan) -> str | None:
    """None when the cache is to be used, else "off" or "off: <why>"."""
    setting = cfg.teacher.output_cache
    if setting == "off":
        return "off"
    why = enumerable(splits.augment)
    if why:
        return f"off: {why}"
    if setting == "on":
        return None
    budget = HOST_MEMORY_FRACTION * host_memory_bytes()
    if plan.nbytes() > budget:
        return (f"off: {plan.nbytes() / 2**30:.2f} GiB of teacher outputs exceed the auto budget of "
                f"{budget / 2**30:.1f} GiB ({HOST_MEMORY_FRACTION:.0%} of this machine's memory; set "
                "teacher.output_cache: on to use it anyway)")
    run_forwards = len(splits.train) * cfg.optim.epochs
    if device.type == "cpu" and plan.rows > run_forwards:
        return (f"off: on the CPU, {plan.rows:,} views cost more teacher forwards than this run's {run_forwards:,} "
                f"(set teacher.output_cache: on to use it anyway)")
    return None


def teacher_outputs_for(cfg: RunConfig, splits: DataSplits, teacher: nn.Module | None,
                        teacher_info: dict[str, Any] | None, device: torch.device,
                        placement: str = "auto") -> tuple[TeacherOutputs | None, str]:
    """The run's teacher-output cache (the arrays it lacks computed now when no process has yet) and its status
    for `RunResult`: "used", "off" or "off: <why>" (said on one line). `placement`: `teacher_outputs.PLACEMENTS`."""
    if teacher is None or teacher_info is None or cfg.distill.method == "student":
        return None, "off"
    augment = splits.augment if enumerable(splits.augment) is None else None
    num_views = augment.num_views if augment is not None and (augment.pad or augment.flip) else 1
    names = ["logits"] + (["pooled"] if needs_pooled(cfg) else [])
    num_classes = splits.num_classes
    widths = {"logits": num_classes}
    if "pooled" in names:
        if not hasattr(teacher, "head") or not hasattr(teacher, "forward_features"):
            return None, "off"  # ACKD refuses such a teacher itself, with its own message
        widths["pooled"] = teacher.head.fc.in_features
    precision = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else "fp32"
    plan = Plan(rows=len(splits.train) * num_views, num_views=num_views, widths=widths, precision=precision)
    status = _decide(cfg, splits, device, plan)
    if status is not None:
        if status != "off":
            _log(status[5:] + "; running the teacher instead", once=True)
        return None, status
    key = cache_key(cfg, splits, teacher_info, precision)
    directory = cache_dir(cfg, teacher_info, key)
    if read_manifest(directory, key, names) is None:
        with locked(_lock_path(cfg, directory)):
            if read_manifest(directory, key, names) is None:
                _add_missing(cfg, splits, teacher, device, key, directory, names, plan)
    files = {name: directory / f"{name}.npy" for name in names}
    arrays = {name: mapped(file) for name, file in files.items()}
    return TeacherOutputs(arrays, num_views, device, directory, placement, files), "used"


def _add_missing(cfg: RunConfig, splits: DataSplits, teacher: nn.Module, device: torch.device, key: dict[str, Any],
                 directory: Path, names: list[str], plan: Plan) -> dict[str, Any]:
    """Compute the arrays of `names` the entry lacks (all of them for a new entry) and write the manifest that
    names them beside the ones it had. Called under the lock."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory, key, [])  # the entry's manifest, whatever arrays it holds
    have = [n for n in names if manifest is not None and read_manifest(directory, key, [n]) is not None]
    missing = [n for n in names if n not in have]
    channels_last = cfg.channels_last and device.type == "cuda"
    loader = DeviceLoader(splits.train, 1, device, splits.mean, splits.std, augment=splits.augment,
                          channels_last=channels_last)
    _log(f"computing {'+'.join(missing)} for {plan.rows:,} views ({len(splits.train):,} images x "
         f"{plan.num_views}) of {cfg.teacher.arch} into {directory}")
    started = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    chunk = 1024 if device.type == "cuda" else 256
    arrays = compute(teacher, loader, missing, directory, autocast_for(cfg, device), chunk)
    teacher.train(was_training)
    compute_s = round(time.perf_counter() - started, 3)
    for meta in arrays.values():
        meta["compute_s"] = compute_s
    kept = {n: m for n, m in (manifest or {}).get("arrays", {}).items() if n in have or n not in names}
    manifest = {"key": key, "num_views": plan.num_views, "images": len(splits.train), "arrays": {**kept, **arrays},
                "row": "image * num_views + view; view = (dy * (2 pad + 1) + dx) * flips + flip",
                "device": str(device), "compute_s": compute_s, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))  # last: the arrays are complete
    _log(f"done in {compute_s:.1f} s")
    return manifest
