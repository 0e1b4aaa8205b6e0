"""Packed trials on one GPU: N training processes at once (the trainer's own step, resnet32x4 -> resnet8x4 KD or
ACKD [2, 2] on CIFAR-100-shaped random data, as in bench_train.py), images/s in all against ONE eager trial; captured
(`run.cuda_graphs: on`) processes, without and, where `nvidia-cuda-mps-control` exists, with a CUDA MPS daemon this
benchmark starts (its own pipe and log folders under /tmp) and stops.

    python benchmarks/bench_pack.py [--methods kd,ackd] [--procs 1,2,4,8] [--steps 200] [--warmup 20]
                                    [--device cuda|cpu] [--budget-s S] [--out FILE]

For each method and MPS setting, max(--procs) processes start once, warm up and capture, then run one timed epoch
of --steps batches per count N: the first N processes start it together (a file barrier), the others wait. A row
is the images of its N processes over the span from the first start to the last end. A group that fails or runs
past its time is recorded with the reason and the benchmark goes on; --budget-s stops starting groups after that
many seconds. Without CUDA nothing is measured unless --device cpu asks for the script's own check (eager steps;
its figures are not a GPU's)."""

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

from ackd_search.backends.packing import MPS_CONTROL, mps_running  # noqa: E402
from ackd_search.errors import one_line  # noqa: E402
from ackd_search.training.device import describe_device  # noqa: E402

READY_TIMEOUT_S = 180.0  # start-up, warm-up and capture of a group
POLL_S = 0.005


def worker(args: argparse.Namespace) -> None:
    """One process: warm up (and capture), say ready, then for each `go-N` file run one timed epoch if its index is
    below N, writing `result-N-<index>.json`; leave at `stop`."""
    barrier, index = Path(args.barrier), args.index
    warm = random_images(args.warmup * args.batch_size, seed=1)
    timed = random_images(args.steps * args.batch_size, seed=2)
    args.compile = False
    run = project_run(args.method, shaped_splits(timed, warm), args, args.mode)
    timed_loader, run.train_loader = run.train_loader, run._loader(warm, shuffle=True)
    run.train_epoch(0)
    run.train_loader = timed_loader
    synchronize(run.device)
    (barrier / f"ready-{index}").touch()
    epoch, parent = 1, os.getppid()
    for count in args.counts:
        while not (barrier / f"go-{count}").exists():
            if (barrier / "stop").exists() or os.getppid() != parent:  # stopped, or the benchmark itself is gone
                return
            time.sleep(POLL_S)
        if index >= count:
            continue
        start = time.time()
        run.train_epoch(epoch)
        synchronize(run.device)
        end = time.time()
        epoch += 1
        result = {"images": timed_loader.num_samples, "start": start, "end": end, "status": run.graphs_status}
        (barrier / f"result-{count}-{index}.json").write_text(json.dumps(result))


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout_s: float) -> str | None:
    """None once every path exists, else why not (a process exited, or the time ran out)."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
        if dead:
            return f"a process exited with code {dead[0].returncode}"
        if time.monotonic() > deadline:
            return f"not done within {timeout_s:.0f} s"
        time.sleep(0.05)
    return None


def measure_group(args: argparse.Namespace, method: str, mode: str, counts: list[int], env: dict[str, str],
                  mps: bool) -> list[dict]:
    """Rows for `counts` from one group of max(counts) processes."""
    rows = []
    base = {"method": method, "mode": mode, "mps": mps}
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as folder:
        barrier = Path(folder)
        cmd = [sys.executable, __file__, "--worker", "--method", method, "--mode", mode, "--barrier", folder,
               "--counts", ",".join(map(str, counts)), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--device", args.device]
        logs = [open(barrier / f"log-{i}.txt", "w") for i in range(max(counts))]
        procs = [subprocess.Popen(cmd + ["--index", str(i)], env=env, stdout=logs[i], stderr=subprocess.STDOUT)
                 for i in range(max(counts))]
        try:
            why = _wait_for([barrier / f"ready-{i}" for i in range(len(procs))], procs, READY_TIMEOUT_S)
            for count in counts:
                if why is not None:
                    rows.append({**base, "procs": count, "error": why, "log_tail": _tail(barrier)})
                    continue
                (barrier / f"go-{count}").touch()
                results = [barrier / f"result-{count}-{i}.json" for i in range(count)]
                why = _wait_for(results, procs, 60.0 + 2.0 * args.steps)
                if why is not None:
                    rows.append({**base, "procs": count, "error": why, "log_tail": _tail(barrier)})
                    continue
                outs = [json.loads(r.read_text()) for r in results]
                span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
                rows.append({**base, "procs": count, "images_per_s": sum(o["images"] for o in outs) / span,
                             "per_process": [o["images"] / (o["end"] - o["start"]) for o in outs],
                             "status": sorted({o["status"] for o in outs})})
        finally:
            (barrier / "stop").touch()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()  # one of ours, by its own handle
                    proc.wait()
            for log in logs:
                log.close()
    return rows


def _tail(barrier: Path, lines: int = 6) -> str:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(barrier.glob("log-*.txt")))
    return "\n".join(text.strip().splitlines()[-lines:])


class Mps:
    """The CUDA MPS control daemon, private to this benchmark (its own pipe and log folders), stopped on exit."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pack-mps-"))
        (self.folder / "pipe").mkdir()
        (self.folder / "log").mkdir()
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}
        self.env.pop("ACKD_SEARCH_MPS", None)  # ask the daemon itself whether it runs

    def __enter__(self) -> dict[str, str]:
        subprocess.run([MPS_CONTROL, "-d"], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not mps_running(self.env) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.env

    def __exit__(self, *exc: object) -> None:
        subprocess.run([MPS_CONTROL], input="quit\n", text=True, env=self.env, check=False, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="kd,ackd")
    parser.add_argument("--procs", default="1,2,4,8", help="process counts to measure, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "none",
                        help="cuda (default with CUDA), or cpu for a check of the script itself")
    parser.add_argument("--budget-s", type=float, default=None, help="start no group after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/pack-<dev>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--counts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.counts = [int(n) for n in args.counts.split(",")]
        worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    counts = sorted({int(n) for n in args.procs.split(",")})
    has_mps = shutil.which(MPS_CONTROL) is not None
    if args.device == "none":
        for method in methods:
            for row in ["1 eager", *(f"{n} captured" + (" +MPS" if has_mps else "") for n in counts)]:
                print(f"{method:<5} {row:<16} not measured: no CUDA")
        return  # nothing measured, nothing written
    device = torch.device(args.device)
    groups = []  # (method, mode, counts, mps)
    for method in methods:
        groups.append((method, "eager", [1], False))
        groups.append((method, "captured", counts, False))
        if has_mps and device.type == "cuda":
            groups.append((method, "captured", counts, True))
    if not has_mps:
        print(f"MPS rows: not measured: no {MPS_CONTROL} on this machine", file=sys.stderr)
    rows, started = [], time.perf_counter()
    for method, mode, group_counts, mps in groups:
        base = {"method": method, "mode": mode, "mps": mps}
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            rows += [{**base, "procs": n, "error": f"not measured: budget of {args.budget_s:.0f} s spent"}
                     for n in group_counts]
            continue
        print(f"{method} {mode}{' +MPS' if mps else ''}: {max(group_counts)} processes", file=sys.stderr, flush=True)
        try:
            if mps:
                with Mps() as env:
                    confirmed = mps_running(env)
                    got = measure_group(args, method, mode, group_counts, env, mps)
                got = [{**r, "mps_confirmed": confirmed} for r in got]
            else:
                got = measure_group(args, method, mode, group_counts, dict(os.environ), mps)
        except Exception as err:  # recorded; the next group still runs
            got = [{**base, "procs": n, "error": one_line(err)} for n in group_counts]
        rows += got
    for row in rows:
        eager = next((r for r in rows if r["method"] == row["method"] and r["mode"] == "eager"
                      and "images_per_s" in r), None)
        if "images_per_s" in row and eager is not None:
            row["vs_one_eager"] = row["images_per_s"] / eager["images_per_s"]
        mps = " +MPS" if row.get("mps") else ""
        if "images_per_s" in row:
            ratio = f"{row['vs_one_eager']:.2f}x one eager trial" if "vs_one_eager" in row else ""
            print(f"{row['method']:<5} {row['procs']} {row['mode']}{mps:<6} {row['images_per_s']:>10.0f} images/s  "
                  f"{ratio}  {row['status']}")
        else:
            print(f"{row['method']:<5} {row['procs']} {row['mode']}{mps:<6} {row['error']}")
    result = {"device": describe_device(device), "torch": torch.__version__, "batch_size": args.batch_size,
              "steps": args.steps, "warmup_steps": args.warmup, "mps_available": has_mps, "budget_s": args.budget_s,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    out = args.out or Path(__file__).parent / "results" / f"pack-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
