"""Search throughput with 1, 2 and 4 local workers on one study (the digits space, pruning off so every trial
does the same number of epochs): trials per minute and scaling efficiency, printed as a table and written as JSON.
Workers sample different configurations (their own sampler seeds), so the rows' trial mixes differ somewhat.

  python benchmarks/bench_workers.py [--trials 16] [--workers 1 2 4] [--out benchmarks/results/workers-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def space_for(tmp: Path, name: str, teacher_cache: Path, n_trials: int, torch_default_threads: bool = False) -> Path:
    data = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    if torch_default_threads:
        data["run"].pop("cpu_threads", None)
    data["study"].update(
        name=name, storage=f"sqlite:///{tmp / (name + '.db')}", n_trials=n_trials, pruner={"name": "none"},
        runs_dir=str(tmp / f"{name}-runs"), artifacts_dir=str(tmp / f"{name}-artifacts"),
    )
    data["run"]["teacher"]["cache_dir"] = str(teacher_cache)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(space: Path, workers: int, n_trials: int) -> float:
    cmd = [sys.executable, str(ROOT / "search.py"), "--space", str(space), "--n-trials", str(n_trials)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the space's run.cpu_threads decides, or torch's default
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmarks/results/workers-cpu.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teachers = tmp / "teachers"
        warm = space_for(tmp, "warmup", teachers, 1)
        run(warm, 1, 1)  # trains and caches the teacher, so no row pays for it
        # Every trial of the digits space runs on one torch thread (run.cpu_threads: 1). The last row drops that
        # setting (torch's default: a thread per core) to show what it is worth on its own.
        plan = [(w, 1) for w in args.workers] + [(1, None)]
        for workers, threads in plan:
            name = f"w{workers}-t{threads or 'default'}"
            space = space_for(tmp, name, teachers, args.trials, torch_default_threads=threads is None)
            wall = run(space, workers, args.trials)
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / (name + '.db')}")
            done = sum(t.state.is_finished() for t in study.trials)
            epochs = sum(len(t.intermediate_values) for t in study.trials)
            rows.append({"workers": workers, "threads_per_trial": threads or os.cpu_count(),
                         "trials": done, "epochs": epochs, "wall_s": round(wall, 1),
                         "trials_per_min": round(60 * done / wall, 2)})
    base = rows[0]["trials_per_min"] / rows[0]["workers"]
    for row in rows:
        row["speedup"] = round(row["trials_per_min"] / rows[0]["trials_per_min"], 2)
        row["efficiency"] = round(row["trials_per_min"] / (base * row["workers"]), 2)
    device = f"cpu: {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"digits search, {args.trials} trials, pruning off; {device}")
    print(f"{'workers':>7} {'threads':>7} {'trials':>6} {'epochs':>6} {'wall_s':>7} {'trials/min':>10} {'speedup':>7} "
          f"{'efficiency':>10}")
    for r in rows:
        print(f"{r['workers']:>7} {r['threads_per_trial']:>7} {r['trials']:>6} {r['epochs']:>6} {r['wall_s']:>7} "
              f"{r['trials_per_min']:>10} {r['speedup']:>7} {r['efficiency']:>10}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "space": "spaces/digits.yaml (pruner none)", "rows": rows,
                               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
