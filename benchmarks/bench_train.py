"""KD training throughput: this project's training path against the DataLoader + torchvision loop users run today.

Teacher resnet32x4 (eval, no grad) -> student resnet8x4 on CIFAR-100-shaped random uint8 images. Rows:
  reference     torch DataLoader over a torchvision-style Dataset, per-image PIL transforms in workers, fp32, plain KD
  project-kd    the trainer's own epoch (`_Run.train_epoch`): DeviceLoader, KD distiller, SGD, the autocast and
                channels-last settings `train` picks for the device
  project-ackd  the same epoch with the ACKD distiller, two auxiliary learners before the last stage ([2, 2])

    python benchmarks/bench_train.py [--device cuda|cpu] [--steps N] [--batch-size 64] [--out FILE] [--compile]
                                     [--cuda-graphs] [--teacher-cache]

With --cuda-graphs the project rows run `train`'s captured step (`run.cuda_graphs: on`: the step captured as one CUDA
graph after a short eager warm-up, replayed for every full batch); without it they run eagerly (`off`). Without CUDA
the captured rows are not measured and say so.

With --teacher-cache the project rows read the teacher's logits from a teacher-output cache (`teacher.output_cache`,
ackd_search/output_cache.py) instead of running the teacher: the trainer gathers each batch's views from it (inside
the captured graph with --cuda-graphs). The cache's one-time computation is not timed, and its contents are random
(speed does not depend on the values; computing real ones for every view would cost hours of CPU teacher forwards).
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
from dataclasses import asdict, dataclass
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
from ackd_search.models import create_model
from ackd_search.training.captured import CapturedStep as _CapturedStep
from ackd_search.training.device import autocast_for, describe_device, resolve_device
from ackd_search.training.loop import Run as _Run
from ackd_search.training.output_cache import TeacherOutputs

TEACHER, STUDENT, NUM_CLASSES, IMAGE_SIZE = "resnet32x4", "resnet8x4", 100, 32
ROWS = ("reference", "project-kd", "project-ackd")
LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 0.05, 0.9, 5e-4, 4.0, 0.1, 0.9


@dataclass
class Row:
    path: str
    images_per_s: float  # median over repeats
    step_ms: float  # median over repeats
    images_per_s_runs: list[float]  # one per repeat, in the order measured
    ratio: float | None = None  # median images/s relative to the reference row's


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(count: int, seed: int = 0) -> TensorSplit:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=gen)
    return TensorSplit(x=x, y=torch.randint(0, NUM_CLASSES, (count,), generator=gen))


# --- (a), (c): this project's path ---------------------------------------------------------------------------------


def project_config(method: str, args: argparse.Namespace) -> RunConfig:
    distill = kd_distill()
    if method == "ackd":
        distill = DistillConfig(method="ackd", ackd=AckdConfig(aux_placements=[2, 2]))
    return RunConfig(student=STUDENT, optim=OptimConfig(epochs=1, batch_size=args.batch_size, lr=LR),
                     teacher=TeacherConfig(arch=TEACHER), distill=distill, device=args.device, compile=args.compile,
                     cuda_graphs="on" if args.cuda_graphs else "off")


def random_outputs(images: int, num_views: int, device: torch.device) -> TeacherOutputs:
    """A teacher-output cache of random fp16 logits (as CIFAR-100's is stored) for `images` x `num_views` views."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((images * num_views, NUM_CLASSES), dtype=np.float32).astype(np.float16)
    return TeacherOutputs({"logits": logits}, num_views, device, Path("<random>"))


def project_run(method: str, splits: DataSplits, args: argparse.Namespace) -> _Run:
    teacher = create_model(TEACHER, NUM_CLASSES)
    outputs = None
    if args.teacher_cache:
        images = max(len(splits.train), len(splits.val))  # the warm-up and timed splits index the same rows
        outputs = random_outputs(images, splits.augment.num_views, resolve_device(args.device))
    return _Run(project_config(method, args), None, splits=splits, teacher=teacher, teacher_info={"arch": TEACHER},
                teacher_outputs=outputs, teacher_output_cache="used" if outputs is not None else "off")


def shaped_splits(train: TensorSplit, other: TensorSplit) -> DataSplits:
    mean, std = channel_stats(train.x)
    return DataSplits(name="cifar100-shaped-random", train=train, val=other, test=other, num_classes=NUM_CLASSES,
                      in_channels=3, image_size=IMAGE_SIZE, mean=mean, std=std, augment=Augment(pad=4, flip=True))


def time_project(method: str, warm: TensorSplit, timed: TensorSplit, args: argparse.Namespace) -> float:
    """Seconds for one training epoch of `timed` (args.steps batches) after a warm-up epoch of `warm` (which also
    captures the step with --cuda-graphs)."""
    run = project_run(method, shaped_splits(timed, warm), args)
    timed_loader = run.train_loader
    run.train_loader = run._loader(warm, shuffle=True)  # the same loader the trainer builds, over the warm-up images
    run.train_epoch(0)  # warm-up: allocator, cuDNN autotuning, torch.compile, CUDA graph capture
    if args.cuda_graphs and run.graphs_status != "captured":
        print(f"{method}: {run.graphs_status}", file=sys.stderr)
    args.graphs_status[method] = run.graphs_status
    run.train_loader = timed_loader
    synchronize(run.device)
    start = time.perf_counter()
    run.train_epoch(1)
    synchronize(run.device)
    return time.perf_counter() - start


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
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in the training process (default: torch's own choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project path (meant for CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="project rows run the captured step (run.cuda_graphs: on); CUDA only")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="project rows read the teacher's logits from a teacher-output cache (random contents)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/train-<dev>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (50_000 // args.batch_size if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if cuda else 2)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.graphs_status = {}
    args.not_measured = []
    if args.cuda_graphs and not cuda:
        args.not_measured = [r for r in args.rows if r.startswith("project-")]
        args.rows = [r for r in args.rows if r not in args.not_measured]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; allowed: {', '.join(ROWS)}")
    if args.cuda_graphs and cuda:  # the warm-up epoch must hold the eager warm-up steps and the capture
        args.warmup = max(args.warmup, _CapturedStep.WARMUP_STEPS + 1)
    if min(args.steps, args.warmup, args.batch_size, args.repeats) < 1:
        parser.error("--steps, --warmup, --batch-size and --repeats must be >= 1")
    suffix = "-teacher-cache" if args.teacher_cache else ""
    args.out = args.out or Path(__file__).parent / "results" / f"train-{device.type}{suffix}.json"
    return args


def run_rows(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    if not args.rows:
        return []
    warm = random_images(args.warmup * args.batch_size, seed=1)
    timed = random_images(args.steps * args.batch_size, seed=2)
    images = TensorSplit(torch.cat([warm.x, timed.x]), torch.cat([warm.y, timed.y]))
    seconds: dict[str, list[float]] = {name: [] for name in args.rows}
    for repeat in range(args.repeats):
        # Rows interleaved and their order rotated, so a burst of load on a shared machine hits no row systematically.
        order = args.rows[repeat % len(args.rows):] + args.rows[: repeat % len(args.rows)]
        for name in order:
            print(f"[{repeat + 1}/{args.repeats}] {name}: {args.warmup} warm-up + {args.steps} timed steps",
                  file=sys.stderr, flush=True)
            if name == "reference":
                seconds[name].append(time_reference(images, device, args))
            else:
                seconds[name].append(time_project(name.removeprefix("project-"), warm, timed, args))
    count = args.steps * args.batch_size
    rows = []
    for name, runs in seconds.items():
        median = statistics.median(runs)
        rows.append(Row(name, count / median, 1000.0 * median / args.steps, [count / s for s in runs]))
    reference = next((r for r in rows if r.path == "reference"), None)
    for row in rows:
        row.ratio = row.images_per_s / reference.images_per_s if reference else None
    return rows


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
        "reference_num_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(),
        "project_bf16_autocast": autocast_for(project, device) is not contextlib.nullcontext,
        "project_channels_last": project.channels_last and device.type == "cuda",
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "cuda_graphs_status": args.graphs_status,
        "teacher_cache": args.teacher_cache,
        "not_measured": {row: "no CUDA" for row in args.not_measured},
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
          f"compile={args.compile}, teacher_cache={args.teacher_cache}")
    print(f"{'path':<14} {'images/s':>10} {'ms/step':>9} {'vs reference':>13}   images/s per repeat")
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        runs = ", ".join(f"{v:.1f}" for v in row.images_per_s_runs)
        print(f"{row.path:<14} {row.images_per_s:>10.1f} {row.step_ms:>9.1f} {ratio:>13}   {runs}")
    for name in args.not_measured:
        print(f"{name:<14} not measured: no CUDA")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
