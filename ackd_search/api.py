"""The Python API: `load_space`, `search`, `export` and `train`, taking the same space as the command line (a file or
a dict) and, optionally, in-memory data (arrays, tensors or any indexable Dataset) and `nn.Module` builders.

In-memory data is written once as an `.npz` beside the study (the `arrays` source), so every trial, worker and later
command line reads it by path. A builder is known to this process only (`python:<name>`): the study says so, and the
command line names what it lacks (give the builder as `py:<file.py>:<function>` to use it there)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml
from torch import nn

from ackd_search.backends.local import run_search
from ackd_search.config import RunConfig, from_dict, load_run_config
from ackd_search.data import DataSplits, splits_from_arrays, splits_from_dataset
from ackd_search.errors import ConfigError
from ackd_search.models import register_builder
from ackd_search.searching.space import Space, load_space_data
from ackd_search.searching.space import load_space as load_space_file
from ackd_search.searching.study import open_existing_study, quiet_optuna
from ackd_search.training import Reporter, RunResult, run_training
from ackd_search.view.export import export_config, select_trial, write_export
from ackd_search.view.progress import EpochBar

Data = DataSplits | Mapping[str, Any] | torch.utils.data.Dataset | Sequence[Any]
Builder = Callable[..., nn.Module]


def load_space(space: str | Path | Mapping[str, Any], source: str = "<dict>") -> Space:
    """A space from a YAML file, or from a dict laid out as the file is (`study`, `run`, `learners`)."""
    if isinstance(space, Mapping):
        return load_space_data(copy.deepcopy(dict(space)), source)
    return load_space_file(space)


def _as_data(data: Data, val_fraction: float, split_seed: int) -> DataSplits:
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, Mapping):  # {"train": (x, y), "val": (x, y), "test": (x, y)} of arrays or tensors
        unknown = sorted(set(data) - {"train", "val", "test", "classes"})
        if unknown or "train" not in data:
            raise ConfigError([f"data: expected keys train (and val, test, classes), got {sorted(data)}"])
        return splits_from_arrays(data["train"], data.get("val"), data.get("test"), classes=data.get("classes"),
                                  val_fraction=val_fraction, split_seed=split_seed)
    return splits_from_dataset(data, val_fraction=val_fraction, split_seed=split_seed)


def save_arrays(splits: DataSplits, folder: Path) -> Path:
    """The splits as an `.npz` in the `arrays` source's layout, named by its contents (so the same data is one
    file, and other data never overwrites it)."""
    arrays: dict[str, np.ndarray] = {}
    for part in ("train", "val", "test"):
        split = getattr(splits, part)
        arrays[f"x_{part}"] = split.x.permute(0, 2, 3, 1).contiguous().numpy()  # the source reads N x H x W x C
        arrays[f"y_{part}"] = split.y.numpy()
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]))
    if splits.classes:
        arrays["classes"] = np.array(list(splits.classes))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"data-{digest.hexdigest()[:16]}.npz"
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return path


def _with_inputs(raw: dict[str, Any], data: Data | None, student: Builder | None, teacher: Builder | None,
                 name: str) -> dict[str, Any]:
    """The space's plain data with in-memory data and builders put where every process can find them."""
    run = raw.setdefault("run", {})
    if student is not None:
        run["student"] = register_builder(f"{name}-student", student)
    if teacher is not None:
        run.setdefault("teacher", {})["arch"] = register_builder(f"{name}-teacher", teacher)
    if data is not None:
        settings = run.setdefault("data", {})
        splits = _as_data(data, float(settings.get("val_fraction", 0.1)), int(settings.get("split_seed", 0)))
        folder = Path((raw.get("study") or {}).get("runs_dir") or f"studies/{name}-runs").parent
        path = save_arrays(splits, folder / f"{name}-data")
        run["data"] = {"name": "arrays", "data_root": str(path)}  # train / val / test as given or carved once
    return raw


def search(space: str | Path | Mapping[str, Any] | Space, *, data: Data | None = None, student: Builder | None = None,
           teacher: Builder | None = None, n_trials: int | None = None, timeout_s: float | None = None,
           storage: str | None = None, confirm: bool = True) -> optuna.Study:
    """Run (or resume) the study a space names, as `search.py --space` does, and return it. `data` replaces the
    space's `run.data` (arrays as {"train": (x, y), "val": ..., "test": ...}, uint8 N x H x W [x C] images and
    integer labels, or an indexable Dataset of (image, label)); `student` / `teacher` are builders
    `fn(num_classes, in_channels=...) -> nn.Module` replacing `run.student` / `run.teacher.arch`. Trials run in
    this process; for several worker processes or Ray, use the command line with the space file."""
    quiet_optuna()
    if isinstance(space, Space):
        raw, source = copy.deepcopy(space.raw), space.source
    elif isinstance(space, Mapping):
        raw, source = copy.deepcopy(dict(space)), "<dict>"
    else:
        raw, source = yaml.safe_load(Path(space).read_text()) or {}, str(space)
    if data is not None or student is not None or teacher is not None:
        name = str((raw.get("study") or {}).get("name") or "study")
        raw = _with_inputs(raw, data, student, teacher, name)
    return run_search(load_space_data(raw, source), n_trials, timeout_s, storage, confirm=confirm)


def export(space: str | Path | Mapping[str, Any] | Space, *, trial: int | None = None, epochs: int | None = None,
           out: str | Path | None = None, force: bool = False, storage: str | None = None) -> RunConfig:
    """The confirmed winner's (or trial `trial`'s) run config at the full budget; written as YAML to `out` when
    given, as `search.py export` does."""
    built = space if isinstance(space, Space) else load_space(space)
    study = open_existing_study(built, storage)
    chosen = select_trial(study, trial)
    if out is not None:
        return write_export(built, study, chosen, Path(out), epochs, force=force)
    return export_config(built, chosen, epochs, study=study)


def train(config: str | Path | RunConfig | Mapping[str, Any], *, epochs: int | None = None,
          output_dir: str | Path | None = None, reporter: Reporter | None = None) -> RunResult:
    """Train a run config to the end and read the test set once, as `search.py train` does."""
    if isinstance(config, RunConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, Mapping):
        cfg = from_dict(RunConfig, copy.deepcopy(dict(config)), source="<dict>")
    else:
        cfg = load_run_config(config)
    if epochs is not None:
        cfg.optim.epochs = int(epochs)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    cfg.eval_test = True
    return run_training(cfg, reporter or EpochBar("train", cfg.optim.epochs), teacher_progress=EpochBar)
