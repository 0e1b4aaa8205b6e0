"""Packed trials on one GPU: N training processes at once (the trainer's own step, resnet32x4 -> resnet8x4 KD or
ACKD [2, 2] on CIFAR-100-shaped random data, as in bench_train.py), images/s in all against ONE eager trial; captured
(`run.cuda_graphs: on`) processes, without and, where `nvidia-cuda-mps-control` exists, with the CUDA MPS daemon.

    python benchmarks/bench_pack.py [--methods kd,ackd] [--procs 1,2,4,8] [--steps 300] [--warmup 20] [--out FILE]

Every process warms up (and captures) first, then all start their timed steps together (a file barrier); the
total is the images of all processes over the span from the first start to the last end. Without CUDA nothing is
measured: every row says "not measured: no CUDA"."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import project_run, random_images, shaped_splits, synchronize  # noqa: E402

from ackd_search.training.device import describe_device  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One process: warm up (and capture), wait at the barrier, time args.steps steps, print JSON."""
    warm = random_images(args.warmup * args.batch_size, seed=1)
    timed = random_images(args.steps * args.batch_size, seed=2)
    args.device, args.compile, args.cuda_graphs = "cuda", False, args.mode == "captured"
    run = project_run(args.method, shaped_splits(timed, warm), args)
    timed_loader, run.train_loader = run.train_loader, run._loader(warm, shuffle=True)
    run.train_epoch(0)
    run.train_loader = timed_loader
    synchronize(run.device)
    barrier = Path(args.barrier)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < args.expect:
        time.sleep(0.01)
    start = time.time()
    run.train_epoch(1)
    synchronize(run.device)
    end = time.time()
    print(json.dumps({"images": timed_loader.num_samples, "start": start, "end": end, "status": run.graphs_status}))


def measure(args: argparse.Namespace, method: str, mode: str, procs: int, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--worker", "--method", method, "--mode", mode, "--barrier", barrier,
               "--expect", str(procs), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size)]
        children = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
        outputs = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    span = max(o["end"] for o in outputs) - min(o["start"] for o in outputs)
    total = sum(o["images"] for o in outputs) / span
    return {"method": method, "mode": mode, "procs": procs, "images_per_s": total,
            "per_process": [o["images"] / (o["end"] - o["start"]) for o in outputs],
            "status": sorted({o["status"] for o in outputs})}


class Mps:
    """The CUDA MPS control daemon, private to this benchmark (its own pipe and log folders), stopped on exit."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pack-mps-"))
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}

    def __enter__(self) -> dict[str, str]:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True)
        return self.env

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="kd,ackd")
    parser.add_argument("--procs", default="1,2,4,8", help="process counts to measure, comma-separated")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack-cuda.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    counts = [int(n) for n in args.procs.split(",")]
    has_mps = shutil.which("nvidia-cuda-mps-control") is not None
    if not torch.cuda.is_available():
        for method in methods:
            for row in ["1 eager", *(f"{n} captured" + (" +MPS" if has_mps else "") for n in counts)]:
                print(f"{method:<5} {row:<16} not measured: no CUDA")
        if not has_mps:
            print("MPS rows: not measured: no nvidia-cuda-mps-control on this machine")
        return  # nothing measured, nothing written
    if not has_mps:
        print("MPS rows: not measured: no nvidia-cuda-mps-control on this machine", file=sys.stderr)
    rows = []
    for method in methods:
        rows.append(measure(args, method, "eager", 1, dict(os.environ)))
        for n in counts:
            rows.append({**measure(args, method, "captured", n, dict(os.environ)), "mps": False})
        if has_mps:
            with Mps() as env:
                for n in counts:
                    rows.append({**measure(args, method, "captured", n, env), "mps": True})
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["mode"] == "eager")
        row["vs_one_eager"] = row["images_per_s"] / base["images_per_s"]
        mps = " +MPS" if row.get("mps") else ""
        print(f"{row['method']:<5} {row['procs']} {row['mode']}{mps:<6} {row['images_per_s']:>10.0f} images/s  "
              f"{row['vs_one_eager']:.2f}x one eager trial  {row['status']}")
    result = {"device": describe_device(torch.device("cuda")), "torch": torch.__version__,
              "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup, "mps_available": has_mps,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
