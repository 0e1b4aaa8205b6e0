"""KD training throughput: this project's training path against the DataLoader + torchvision loop users run today.

Teacher resnet32x4 (eval, no grad) -> student resnet8x4 on CIFAR-100-shaped random uint8 images. Rows:
  reference              torch DataLoader over a torchvision-style Dataset, per-image PIL transforms in workers,
                         fp32, plain KD
  project-kd             the trainer's own epoch (`_Run.train_epoch`): DeviceLoader, KD distiller, SGD, the autocast
                         and channels-last settings `train` picks for the device
  project-ackd           the same epoch with the ACKD distiller, two auxiliary learners before the last stage ([2, 2])
  project-ackd-features  ACKD with the adversary on pooled features (`adv_input: features`, connectors, the teacher's
                         pooled features as the real source)

    python benchmarks/bench_train.py [--device cuda|cpu] [--steps N] [--batch-size 64] [--out FILE] [--compile]
                                     [--modes eager,captured,captured-cache] [--cuda-graphs] [--teacher-cache]
                                     [--budget-s S]

Every project row runs in each of `--modes` (one JSON row per row and mode, `project-kd/captured`):
  eager                 `run.cuda_graphs: off`, the teacher run for every batch
  captured              `run.cuda_graphs: on`: the step captured as one CUDA graph after a short eager warm-up,
                        replayed for every full batch (CUDA only: elsewhere "not measured: no CUDA")
  eager-cache, captured-cache
                        the same, reading the teacher's outputs from a teacher-output cache (`teacher.output_cache`,
                        ackd_search/training/output_cache.py) placed as a run places it (the whole arrays on the GPU
                        when they fit its free memory), gathered inside the captured graph
  captured-cache-epoch  the cache's per-epoch gather forced (`teacher_outputs.py`, placement `epoch`): the epoch's rows
                        gathered on the host at its start into a device buffer the graph indexes
`--cuda-graphs` / `--teacher-cache` (without `--modes`) pick one mode as before. The cache's one-time computation is
not timed and its contents are random (speed does not depend on the values). A row that fails is recorded with its
error and the others still run; `--budget-s` stops starting rows after that many seconds (the rest say so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ackd_search.config import AckdConfig, DistillConfig, OptimConfig, RunConfig, TeacherConfig, kd_distill
from ackd_search.data import Augment, DataSplits, TensorSplit, channel_stats
from ackd_search.errors import one_line
from ackd_search.models import create_model
from ackd_search.training.captured import CapturedStep as _CapturedStep
from ackd_search.training.device import autocast_for, describe_device, resolve_device
from ackd_search.training.loop import Run as _Run
from ackd_search.training.output_cache import needs_pooled
from ackd_search.training.teacher_outputs import TeacherOutputs

TEACHER, STUDENT, NUM_CLASSES, IMAGE_SIZE = "resnet32x4", "resnet8x4", 100, 32
ROWS = ("reference", "project-kd", "project-ackd", "project-ackd-features")
MODES = ("eager", "captured", "eager-cache", "captured-cache", "captured-cache-epoch")
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 0.05, 0.9, 5e-4, 4.0, 0.1, 0.9


@dataclass
class Row:
    path: str
    images_per_s: float | None  # median over repeats (None: not measured, or failed)
    step_ms: float | None
    images_per_s_runs: list[float]  # one per repeat, in the order measured
    ratio: float | None = None  # median images/s relative to the reference row's
    mode: str | None = None  # project rows: eager, captured, ...
    cuda_graphs: list[str] = field(default_factory=list)  # the run's status per repeat ("captured", "eager: why")
    cache_placement: str | None = None  # where the cached rows were read from (device, epoch, mapped)
    errors: list[str] = field(default_factory=list)  # one line per failed repeat
    not_measured: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(count: int, seed: int = 0) -> TensorSplit:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)
    return TensorSplit(x=x, y=torch.randint(0, NUM_CLASSES, (count,), generator=gen))


# --- (a), (c): this project's path ---------------------------------------------------------------------------------


def project_config(method: str, args: argparse.Namespace, mode: str = "eager") -> RunConfig:
    distill = kd_distill()
    if method == "ackd":
        distill = DistillConfig(method="ackd", ackd=AckdConfig(aux_placements=[2, 2]))
    elif method == "ackd-features":
        distill = DistillConfig(method="ackd", ackd=AckdConfig(aux_placements=[2, 2], adv_input="features"))
    return RunConfig(student=STUDENT, optim=OptimConfig(epochs=1, batch_size=args.batch_size, lr=LR),
                     teacher=TeacherConfig(arch=TEACHER), distill=distill, device=args.device, compile=args.compile,
                     cuda_graphs="on" if mode.startswith("captured") else "off")


_RANDOM: dict[tuple[int, int, int], np.ndarray] = {}  # (rows, width, seed) -> fp16 array: built once per process


def random_array(rows: int, width: int, seed: int) -> np.ndarray:
    """Random fp16 rows (as CIFAR-100's cache is stored): a random block repeated, fast to build at any size."""
    key = (rows, width, seed)
    if key not in _RANDOM:
        block = np.random.default_rng(seed).standard_normal((4096, width), dtype=np.float32).astype(np.float16)
        _RANDOM[key] = np.resize(block, (rows, width))
    return _RANDOM[key]


def random_outputs(images: int, num_views: int, device: torch.device, pooled_width: int | None = None,
                   placement: str = "auto") -> TeacherOutputs:
    """A teacher-output cache of random fp16 logits (and pooled features) for `images` x `num_views` views."""
    arrays = {"logits": random_array(images * num_views, NUM_CLASSES, 0)}
    if pooled_width:
        arrays["pooled"] = random_array(images * num_views, pooled_width, 1)
    return TeacherOutputs(arrays, num_views, device, Path("<random>"), placement)


def project_run(method: str, splits: DataSplits, args: argparse.Namespace, mode: str = "eager") -> _Run:
    cfg = project_config(method, args, mode)
    teacher = create_model(TEACHER, NUM_CLASSES)
    outputs = None
    if mode.endswith("-cache") or mode.endswith("-cache-epoch"):
        images = max(len(splits.train), len(splits.val))  # the warm-up and timed splits index the same rows
        pooled = teacher.head.fc.in_features if needs_pooled(cfg) else None
        outputs = random_outputs(images, splits.augment.num_views, resolve_device(args.device), pooled,
                                 "epoch" if mode.endswith("-epoch") else "auto")
    return _Run(cfg, None, splits=splits, teacher=teacher, teacher_info={"arch": TEACHER},
                teacher_outputs=outputs, teacher_output_cache="used" if outputs is not None else "off")


def shaped_splits(train: TensorSplit, other: TensorSplit) -> DataSplits:
    mean, std = channel_stats(train.x)
    return DataSplits(name="cifar100-shaped-random", train=train, val=other, test=other, num_classes=NUM_CLASSES,
                      in_channels=3, image_size=IMAGE_SIZE, mean=mean, std=std, augment=Augment(pad=4, flip=True))


def time_project(method: str, mode: str, warm: TensorSplit, timed: TensorSplit,
                 args: argparse.Namespace) -> tuple[float, str, str | None]:
    """(seconds for one training epoch of `timed` (args.steps batches) after a warm-up epoch of `warm` (which also
    captures the step in a captured mode), the run's cuda_graphs status, the cache's placement or None)."""
    run = project_run(method, shaped_splits(timed, warm), args, mode)
    timed_loader = run.train_loader
    run.train_loader = run._loader(warm, shuffle=True)  # the same loader the trainer builds, over the warm-up images
    run.train_epoch(0)  # warm-up: allocator, cuDNN autotuning, torch.compile, CUDA graph capture
    if mode.startswith("captured") and run.graphs_status != "captured":
        print(f"{method}/{mode}: {run.graphs_status}", file=sys.stderr)
    run.train_loader = timed_loader
    synchronize(run.device)
    start = time.perf_counter()
    run.train_epoch(1)
    synchronize(run.device)
    seconds = time.perf_counter() - start
    placement = run.teacher_outputs.placement if run.teacher_outputs is not None else None
    return seconds, run.graphs_status, placement


# --- (b): the reference loop -------------------------------------------------------------------------------------


class ArrayImages(Dataset):
    """What torchvision.datasets.CIFAR100 does per item: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, split: TensorSplit, transform: Callable):
        self.data = split.x.permute(0, 2, 3, 1).numpy()
        self.targets = split.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def time_reference(images: TensorSplit, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds for args.steps KD steps after args.warmup untimed ones, from one DataLoader epoch over `images`."""
    mean, std = channel_stats(images.x)
    transform = transforms.Compose([
        transforms.RandomCrop(IMAGE_SIZE, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    loader = DataLoader(ArrayImages(images, transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    teacher = create_model(TEACHER, NUM_CLASSES).to(device).eval()
    student = create_model(STUDENT, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    start = None
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), F.softmax(teacher_logits / TEMPERATURE, dim=1),
                      reduction="batchmean") * TEMPERATURE**2
        loss = CE_WEIGHT * F.cross_entropy(logits, y) + KD_WEIGHT * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


# --- driver ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (default: one 50k-image epoch on CUDA, 20 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 20 CUDA, 2 CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every row this many times, rows interleaved, and report the median")
    parser.add_argument("--num-workers", type=int, default=None, help="reference DataLoader workers (8 CUDA, 2 CPU)")
    parser.add_argument("--rows", default="reference,project-kd,project-ackd",
                        help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--modes", default=None, help=f"project rows' modes, comma-separated: {', '.join(MODES)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in the training process (default: torch's own choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project path (meant for CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true", help="without --modes: the captured mode alone")
    parser.add_argument("--teacher-cache", action="store_true", help="without --modes: the mode with the cache")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement after this many seconds; the rows left say 'not measured'")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/train-<dev>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (50_000 // args.batch_size if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if cuda else 2)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; allowed: {', '.join(ROWS)}")
    if args.modes is None:
        args.modes = [("captured" if args.cuda_graphs else "eager") + ("-cache" if args.teacher_cache else "")]
    else:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; allowed: {', '.join(MODES)}")
    if any(m.startswith("captured") for m in args.modes) and cuda:  # the warm-up epoch holds the warm-up + capture
        args.warmup = max(args.warmup, _CapturedStep.WARMUP_STEPS + 1)
    if min(args.steps, args.warmup, args.batch_size, args.repeats) < 1:
        parser.error("--steps, --warmup, --batch-size and --repeats must be >= 1")
    if args.out is None:
        suffix = "-teacher-cache" if args.modes == ["eager-cache"] or args.modes == ["captured-cache"] else ""
        args.out = Path(__file__).parent / "results" / f"train-{device.type}{suffix}.json"
    return args


def planned(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(row, mode) pairs to measure, the reference first (mode None)."""
    out: list[tuple[str, str | None]] = [("reference", None)] if "reference" in args.rows else []
    return out + [(row, mode) for row in args.rows if row != "reference" for mode in args.modes]


def row_name(row: str, mode: str | None) -> str:
    return row if mode is None else f"{row}/{mode}"


def run_rows(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    plan = planned(args)
    if not plan:
        return []
    warm = random_images(args.warmup * args.batch_size, seed=1)
    timed = random_images(args.steps * args.batch_size, seed=2)
    images = TensorSplit(torch.cat([warm.x, timed.x]), torch.cat([warm.y, timed.y]))
    rows = {row_name(r, m): Row(row_name(r, m), None, None, [], mode=m) for r, m in plan}
    for r, m in plan:
        if m is not None and m.startswith("captured") and device.type != "cuda":
            rows[row_name(r, m)].not_measured = "no CUDA"
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        # Rows interleaved and their order rotated, so a burst of load on a shared machine hits no row systematically.
        order = plan[repeat % len(plan):] + plan[: repeat % len(plan)]
        for r, m in order:
            row = rows[row_name(r, m)]
            if row.not_measured == "no CUDA":
                continue
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                row.not_measured = row.not_measured or f"budget of {args.budget_s:.0f} s spent"
                continue
            print(f"[{repeat + 1}/{args.repeats}] {row.path}: {args.warmup} warm-up + {args.steps} timed steps",
                  file=sys.stderr, flush=True)
            try:
                if m is None:
                    seconds[row.path].append(time_reference(images, device, args))
                    continue
                took, status, placement = time_project(r.removeprefix("project-"), m, warm, timed, args)
            except Exception as err:  # recorded; the other rows still run
                row.errors.append(one_line(err))
                print(f"{row.path}: failed: {one_line(err)}", file=sys.stderr, flush=True)
                continue
            seconds[row.path].append(took)
            row.cuda_graphs.append(status)
            row.cache_placement = placement
    count = args.steps * args.batch_size
    for name, runs in seconds.items():
        row = rows[name]
        row.images_per_s_runs = [count / s for s in runs]
        if runs:
            median = statistics.median(runs)
            row.images_per_s, row.step_ms = count / median, 1000.0 * median / args.steps
            row.not_measured = None
    reference = rows.get("reference")
    for row in rows.values():
        if reference is not None and reference.images_per_s and row.images_per_s:
            row.ratio = row.images_per_s / reference.images_per_s
    return list(rows.values())


def report(args: argparse.Namespace, rows: list[Row], load_before: tuple[float, ...]) -> dict:
    device = torch.device(args.device)
    project = project_config("kd", args)
    return {
        "device": describe_device(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "teacher": TEACHER,
        "student": STUDENT,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "modes": args.modes,
        "reference_num_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(),
        "project_bf16_autocast": autocast_for(project, device) is not contextlib.nullcontext,
        "project_channels_last": project.channels_last and device.type == "cuda",
        "compile": args.compile,
        "budget_s": args.budget_s,
        "load_average_before": [round(v, 2) for v in load_before],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": [asdict(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compile and args.device == "cpu":
        print("note: --compile on CPU compiles with inductor's C++ backend; the warm-up absorbs the compile time, "
              "expect minutes", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = run_rows(args)
    result = report(args, rows, load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['device']}; batch {args.batch_size}, {args.steps} timed steps, median of {args.repeats}, "
          f"compile={args.compile}")
    print(f"{'path':<44} {'images/s':>10} {'ms/step':>9} {'vs reference':>13}   status")
    for row in rows:
        if row.images_per_s is None:
            why = row.not_measured or ("failed: " + row.errors[-1] if row.errors else "not measured")
            print(f"{row.path:<44} {why}")
            continue
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        status = ", ".join(sorted(set(row.cuda_graphs))) + (f", cache {row.cache_placement}"
                                                            if row.cache_placement else "")
        print(f"{row.path:<44} {row.images_per_s:>10.1f} {row.step_ms:>9.1f} {ratio:>13}   {status}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
