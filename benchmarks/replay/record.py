"""RECORD: every configuration's whole learning curve, once, for the tabular replay of the search.

Configurations are sampled from a shipped space with Optuna's RandomSampler through the product's own
`space.suggest` (only acting knobs vary, learner structures are legal), the reference preset first (the product
enqueues it first), and each is trained to its full trial budget with the product's own `run_training`, for several
seeds (`cfg.seed`), keeping `val_acc` per epoch. Runs go to a JSON-lines file as they finish (resumable: a run
already there is not run again); `compact` turns it into the table JSON the replay reads.

Tasks: `digits` is spaces/digits.yaml as shipped (teacher cached in the folder given); `shapes` is the same search
space (digits.yaml's `run.distill`, `learners`, optimiser ranges) on the procedurally generated 16x16 RGB set of
`shapes.py` with the digits CNN pair in RGB, 15 epochs."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "studies" / "replay"  # gitignored: teachers, the shapes .npz, the raw run logs
SHAPES = {"n_train": 2400, "n_val": 800, "n_test": 800, "seed": 0, "noise": 0.06, "contrast": 0.35, "distractor": 0.0}


def task_space(task: str, work: Path = WORK) -> dict[str, Any]:
    """The raw space data (as a file lays it out) of a task; teacher cache in `work`/teachers."""
    raw = yaml.safe_load((ROOT / "spaces" / "digits.yaml").read_text())
    raw["run"]["teacher"]["cache_dir"] = str(work / "teachers")
    raw["run"]["cpu_threads"] = 1
    raw["run"]["device"] = "cpu"
    if task == "digits":
        return raw
    if task != "shapes":
        raise SystemExit(f"unknown task {task!r}; allowed: digits, shapes")
    from benchmarks.replay import shapes

    npz = shapes.write(work / "shapes16.npz", **SHAPES)
    shaped = copy.deepcopy(raw)
    shaped["study"]["name"] = "shapes-ackd"
    shaped["study"]["storage"] = "sqlite:///studies/shapes-ackd.db"
    # 15 epochs: milestones 150/180/210 of 240 -> 9.4/11.25/13.1 -> [9, 11, 13]: the lr decays after epochs 9, 11
    # and 13. digits.yaml's rule (20 epochs, milestones [12, 15, 18] (12.5 rounds half to even), n_warmup_steps 13:
    # the first cut at the first epoch trained at the decayed lr) gives 10 here.
    shaped["study"]["pruner"] = {"name": "percentile", "percentile": 90.0, "n_startup_trials": 5, "n_warmup_steps": 10}
    run = shaped["run"]
    run["data"] = {"name": "arrays", "data_root": str(npz)}
    run["optim"]["epochs"] = 15
    run["optim"]["batch_size"] = 64
    run["teacher"]["optim"] = {"epochs": 30}
    return shaped


def load_task_space(raw: dict[str, Any]):
    from ackd_search.searching.space import load_space_data

    return load_space_data(copy.deepcopy(raw), "replay-task")


def sample_configs(raw: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """The reference preset, then n - 1 RandomSampler draws through `space.suggest`; params as the sampler saw
    them, with their distributions (for the replay's distance) and the effective learner structure."""
    space = load_task_space(raw)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    values, outside = space.preset_values("reference")
    if outside:
        raise SystemExit(f"reference preset outside the space: {outside}")
    study.enqueue_trial(values, user_attrs={"preset": "reference"})
    configs = []
    for i in range(n):
        trial = study.ask()
        space.suggest(trial)
        frozen = study._storage.get_trial(trial._trial_id)
        configs.append({"id": i, "preset": frozen.user_attrs.get("preset"), "params": dict(frozen.params),
                        "aux_placements": frozen.user_attrs.get("aux_placements", []),
                        "distributions": {k: optuna.distributions.distribution_to_json(d)
                                          for k, d in frozen.distributions.items()}})
        study.tell(trial, 0.0)
    return configs


# --- one run, in a worker process -----------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_one(job: tuple[dict[str, Any], dict[str, Any], int]) -> dict[str, Any]:
    """Train one (config, seed) to its full budget; the curve up to a failure, marked, when it fails."""
    raw, config, seed = job
    from ackd_search.training import NonFiniteLossError, run_training

    space = load_task_space(raw)
    cfg = space.run_config(config["params"])
    cfg.seed, cfg.output_dir = seed, None
    curve: list[float] = []

    def reporter(epoch: int, metrics: dict[str, Any]) -> None:
        curve.append(round(float(metrics["val_acc"]), 2))

    started = time.perf_counter()
    status = "ok"
    try:
        run_training(cfg, reporter)
    except NonFiniteLossError as err:
        status = f"nonfinite: {str(err)[:160]}"
    except Exception as err:  # a broken config fails alone, recorded
        status = f"error: {type(err).__name__}: {str(err)[:160]}"
    return {"config": config["id"], "seed": seed, "curve": curve, "status": status,
            "wall_s": round(time.perf_counter() - started, 2), "pid": os.getpid()}


def prepare(raw: dict[str, Any]) -> dict[str, Any]:
    """Train (or read) the teacher and its output cache once, before the workers start."""
    from ackd_search.data import get_splits
    from ackd_search.training.device import resolve_device
    from ackd_search.training.output_cache import teacher_outputs_for
    from ackd_search.training.runner import load_teacher

    _init_worker()
    space = load_task_space(raw)
    cfg = space.run_config(space.default_values())
    splits = get_splits(cfg.data)
    started = time.perf_counter()
    teacher, info = load_teacher(cfg, splits)
    teacher_outputs_for(cfg, splits, teacher, info, resolve_device(cfg.device))
    return {"teacher": {k: info.get(k) for k in ("arch", "val_acc", "test_acc", "epochs") if k in info},
            "teacher_ready_s": round(time.perf_counter() - started, 1),
            "images": {"train": len(splits.train.y), "val": len(splits.val.y)},
            "image_size": splits.image_size, "in_channels": splits.in_channels, "num_classes": splits.num_classes}


def done_runs(log: Path) -> dict[tuple[int, int], dict[str, Any]]:
    runs = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                runs[(row["config"], row["seed"])] = row
    return runs


def record(task: str, n_configs: int, seeds: list[int], workers: int, log: Path, sample_seed: int = 12345,
           limit: int | None = None) -> None:
    """Sample the configurations (deterministic in `sample_seed`), write the header once, run what is missing."""
    raw = task_space(task)
    configs = sample_configs(raw, n_configs, sample_seed)
    header_path = log.with_suffix(".header.json")
    info = prepare(raw)
    if not header_path.exists():
        header = {"task": task, "space": raw, "sample_seed": sample_seed, "n_configs": n_configs, "seeds": seeds,
                  "configs": configs, "data": info, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "shapes": SHAPES if task == "shapes" else None}
        header_path.write_text(json.dumps(header))
    header = json.loads(header_path.read_text())
    if header["configs"] != json.loads(json.dumps(configs)):
        raise SystemExit(f"{header_path}: recorded with other configurations (n_configs or sample seed changed)")
    done = done_runs(log)
    jobs = [(raw, c, s) for c in configs for s in seeds if (c["id"], s) not in done]
    jobs = jobs[:limit] if limit else jobs
    print(f"{task}: {len(done)} runs recorded, {len(jobs)} to run with {workers} workers -> {log}", flush=True)
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool, log.open("a") as out:
        for k, row in enumerate(pool.imap_unordered(run_one, jobs, chunksize=1), 1):
            out.write(json.dumps(row) + "\n")
            out.flush()
            elapsed = time.perf_counter() - started
            print(f"{task} {k}/{len(jobs)} config {row['config']} seed {row['seed']} {row['status'][:30]} "
                  f"final {row['curve'][-1] if row['curve'] else None} {row['wall_s']:.1f}s | "
                  f"{elapsed / 60:.1f} min, eta {(len(jobs) - k) * elapsed / k / 60:.1f} min", flush=True)


def compact(log: Path, out: Path, wall_s: float | None = None, note: str | None = None) -> dict[str, Any]:
    """The table JSON: task metadata, and per config its params, structure and per-seed curves."""
    header = json.loads(log.with_suffix(".header.json").read_text())
    runs = done_runs(log)
    space = load_task_space(header["space"])
    cfg = space.run_config(space.default_values())
    seeds = header["seeds"]
    configs = []
    dists: dict[str, Any] = {}
    for c in header["configs"]:
        by_seed = {s: runs.get((c["id"], s)) for s in seeds}
        if any(r is None for r in by_seed.values()):
            continue
        dists.update(c["distributions"])
        row = {"id": c["id"], "params": c["params"], "aux_placements": c["aux_placements"],
               "curves": [by_seed[s]["curve"] for s in seeds],
               "status": [by_seed[s]["status"] for s in seeds]}
        if c["preset"]:
            row["preset"] = c["preset"]
        configs.append(row)
    walls = [r["wall_s"] for r in runs.values()]
    table = {
        "task": header["task"], "space_file": "spaces/digits.yaml", "space": header["space"],
        "derived": None if header["task"] == "digits" else "digits.yaml's distill/learners/optim ranges; data, "
                   "epochs, batch size changed (benchmarks/replay/record.py task_space)",
        "epochs": cfg.optim.epochs, "lr_milestones": cfg.optim.scaled_milestones(), "lr_schedule": cfg.optim.schedule,
        "student": cfg.student, "teacher": cfg.teacher.arch, "data": header["data"], "shapes": header.get("shapes"),
        "seeds": seeds, "sample_seed": header["sample_seed"], "sampler": "RandomSampler via space.suggest, "
        "reference preset first", "distributions": dists, "n_configs": len(configs),
        "runs": {"count": len(runs), "failed": sum(r["status"] != "ok" for r in runs.values()),
                 "mean_wall_s": round(sum(walls) / max(len(walls), 1), 2),
                 "run_wall_s_sum": round(sum(walls), 1), "recording_wall_s": wall_s, "recording_note": note},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "optuna": optuna.__version__, "torch_threads_per_worker": 1},
        "started": header["started"], "compacted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "configs": configs,
    }
    import torch

    table["machine"]["torch"] = torch.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(f"{out}: {len(configs)} configs x {len(seeds)} seeds, {out.stat().st_size / 1e3:.0f} kB")
    return table
