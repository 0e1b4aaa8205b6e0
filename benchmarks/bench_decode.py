"""Decoded once per study: what an ImageFolder costs a trial with the decode cache, against decoding every time.

Generates an ImageFolder of JPEGs of random sizes (default 2,000 images, 64-160 px a side, 10 classes) in a temporary
folder, then measures, each load in a FRESH process (what a later trial or worker pays):
  first load      `get_splits` on an empty cache: scan, decode + resize + centre-crop, write the .npy arrays
  later load      `get_splits` again: scan, key, sha256 check of the arrays once per process, memory-map them
  decode only     decoding + resizing every file without a cache (what each trial would pay without one)
and, in this process, a training-like loop (ResizedCropFlip, shuffled, a small CNN step) over DeviceLoader batches
resident vs streaming, and the reference: torchvision ImageFolder + DataLoader decoding every epoch.

    python benchmarks/bench_decode.py [--images 2000] [--image-size 64] [--epochs 2] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from ackd_search.config import DataConfig
from ackd_search.data import DeviceLoader, ResizedCropFlip, get_splits

REPO = Path(__file__).resolve().parents[1]

# Each fresh process prints one JSON line: the seconds of the measured call, and of its imports before it.
_LOAD = """
import json, sys, time
t0 = time.perf_counter()
from ackd_search.config import DataConfig
from ackd_search.data import get_splits
t1 = time.perf_counter()
cfg = DataConfig(name="imagefolder", data_root=sys.argv[1], cache_dir=sys.argv[2], image_size=int(sys.argv[3]))
s = get_splits(cfg)
n = len(s.train) + len(s.val) + len(s.test)
print(json.dumps({"call_s": time.perf_counter() - t1, "import_s": t1 - t0, "images": n}))
"""
_DECODE_ONLY = """
import json, sys, time
t0 = time.perf_counter()
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from ackd_search.data import images
from ackd_search.data.decode_cache import DECODE_THREADS
from ackd_search.data.folder_scan import scan
t1 = time.perf_counter()
listing = scan(Path(sys.argv[1]))
paths = [listing.root / e.rel for split in listing.splits.values() for e in split]
size = int(sys.argv[3])
with ThreadPoolExecutor(DECODE_THREADS) as pool:
    n = sum(1 for _ in pool.map(lambda p: images.decode(p, size, False), paths))
print(json.dumps({"call_s": time.perf_counter() - t1, "import_s": t1 - t0, "images": n}))
"""


def make_folder(root: Path, n: int, classes: int, seed: int = 0) -> None:
    """JPEGs of smooth colour fields plus noise (so they compress like photos, not like noise), 64-160 px a side."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(64, 161, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 255, (3, 3))
        field = base[:, 0, None, None] + base[:, 1, None, None] * xx + base[:, 2, None, None] * yy
        img = np.clip(field.transpose(1, 2, 0) * 0.5 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def fresh(code: str, root: Path, cache: Path, size: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(root), str(cache), str(size)], cwd=REPO, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    result["log"] = [line for line in out.stderr.splitlines() if "ackd-search: data:" in line]
    return result


class TinyNet(nn.Module):
    """A small CNN, so the loop does a training step's work and the data's pace shows against it."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def run_epochs(batches, epochs: int, device: torch.device, model: nn.Module | None, set_epoch=None) -> dict:
    """images/s over `epochs` epochs after one warm-up epoch; `model` None: the loader alone."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
    rates = []
    for epoch in range(epochs + 1):
        if set_epoch is not None:
            set_epoch(epoch)
        count, start = 0, time.perf_counter()
        for x, y in batches():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if model is not None:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                x.sum().item()  # touch the batch (and wait for it on a GPU)
            count += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch:  # epoch 0 warms up (first touch of the memory map, allocator, worker start)
            rates.append(count / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "runs": rates}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_before": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="reference DataLoader workers")
    # One torch thread by default: on a shared 2-core machine two threads stall on each other whenever another job
    # holds a core (measured here: the same loader loop 4-8x slower), which would measure the neighbours, not this.
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the fresh processes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        root, cache = Path(tmp) / "folder", Path(tmp) / "decoded"
        started = time.perf_counter()
        make_folder(root, args.images, args.classes)
        generate_s = time.perf_counter() - started
        folder_mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20
        print(f"generated {args.images} JPEGs ({folder_mb:.1f} MB) in {generate_s:.1f} s", file=sys.stderr)
        loads = {"first load (decode + cache write)": fresh(_LOAD, root, cache, args.image_size),
                 "later load (memory-mapped cache)": fresh(_LOAD, root, cache, args.image_size),
                 "later load, again": fresh(_LOAD, root, cache, args.image_size),
                 "decode only, no cache": fresh(_DECODE_ONLY, root, cache, args.image_size)}
        splits = get_splits(DataConfig(name="imagefolder", data_root=str(root), cache_dir=str(cache),
                                       image_size=args.image_size))
        assert isinstance(splits.augment, ResizedCropFlip), splits.augment
        loops = {}
        for resident in (True, False):
            loader = DeviceLoader(splits.train, args.batch_size, device, splits.mean, splits.std,
                                  augment=splits.augment, shuffle=True, resident=resident)
            for label, model in (("loader only", None), ("with CNN step", TinyNet(splits.in_channels,
                                                                                   splits.num_classes).to(device))):
                name = f"DeviceLoader {'resident' if resident else 'streaming'}, {label}"
                loops[name] = run_epochs(lambda ld=loader: iter(ld), args.epochs, device, model, loader.set_epoch)
        norm = transforms.Normalize(splits.mean, splits.std)
        reference = torchvision.datasets.ImageFolder(str(root / "train"), transform=transforms.Compose([
            transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size),
            transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            norm]))
        dl = DataLoader(reference, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
        for label, model in (("loader only", None), ("with CNN step", TinyNet(3, splits.num_classes).to(device))):
            loops[f"torchvision ImageFolder + DataLoader({args.workers} workers), {label}"] = run_epochs(
                lambda: iter(dl), args.epochs, device, model)
    report = {"machine": info, "device": str(device), "images": args.images, "classes": args.classes,
              "image_size": args.image_size, "source_sizes": "64-160 px a side, JPEG quality 90",
              "folder_mb": round(folder_mb, 2), "train_images": len(splits.train), "batch_size": args.batch_size,
              "epochs_timed": args.epochs, "notes": "fresh process per load; the cache was just written, so later "
              "loads read it from the page cache; the loops time epochs after one warm-up epoch",
              "loads": loads, "loops": loops, "load_average_after": os.getloadavg(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"\n{'load (fresh process)':36} {'call s':>7} {'imports s':>10} {'process s':>10} {'images':>7}")
    for name, r in loads.items():
        print(f"{name:36} {r['call_s']:7.2f} {r['import_s']:10.2f} {r['process_s']:10.2f} {r['images']:7d}")
    print(f"\n{'training-like loop (' + str(device) + ')':72} {'images/s':>9}")
    for name, r in loops.items():
        print(f"{name:72} {r['images_per_s']:9.0f}")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"decode-{device.type}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
