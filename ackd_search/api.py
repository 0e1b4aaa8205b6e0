"""The Python API: `load_space`, `search`, `export` and `train`, taking the same space as the command line (a file or
a dict) and, optionally, in-memory data (arrays, tensors or any indexable Dataset) and `nn.Module` builders.

In-memory data is written once as an `.npz` beside the study (the `arrays` source), so every trial, worker and later
command line reads it by path. `search` writes the space it ran as `<name>-space.yaml` beside the study, the file the
command line reopens it with. A builder is known to this process only (`python:<name>`): the command line reads
the study (report, dashboard) but names what it lacks to build one (give it as `py:<file.py>:<function>` there)."""

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
from ackd_search.files import write_text_atomic
from ackd_search.models import register_builder
from ackd_search.searching.confirm import min_seeds
from ackd_search.searching.record import StudyPaths
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


def _beside_study(raw: Mapping[str, Any], name: str) -> Path:
    """The folder that holds the study's runs folder: its in-memory data and its space file go there too."""
    return Path((raw.get("study") or {}).get("runs_dir") or f"studies/{name}-runs").parent


def _write_space(path: Path, raw: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "# written by ackd_search.search(): the space this study was made from, for the command "
                      "line\n" + yaml.safe_dump(dict(raw), sort_keys=False))


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
        path = save_arrays(splits, _beside_study(raw, name) / f"{name}-data")
        run["data"] = {"name": "arrays", "data_root": str(path)}  # train / val / test as given or carved once
    return raw


def _plain(space: str | Path | Mapping[str, Any] | Space) -> tuple[dict[str, Any], str]:
    """(a copy of the space's plain data, where it came from)."""
    if isinstance(space, Space):
        return copy.deepcopy(space.raw), space.source
    if isinstance(space, Mapping):
        return copy.deepcopy(dict(space)), "<dict>"
    return yaml.safe_load(Path(space).read_text()) or {}, str(space)


def _study_name(raw: Mapping[str, Any]) -> str:
    return str((raw.get("study") or {}).get("name") or "study")


def search(space: str | Path | Mapping[str, Any] | Space, *, data: Data | None = None, student: Builder | None = None,
           teacher: Builder | None = None, n_trials: int | None = None, timeout_s: float | None = None,
           storage: str | None = None, confirm: bool = True) -> optuna.Study:
    """Run (or resume) the study a space names, as `search.py --space` does, and return it. `data` replaces the
    space's `run.data` (arrays as {"train": (x, y), "val": ..., "test": ...}, uint8 N x H x W [x C] images and
    integer labels, or an indexable Dataset of (image, label)); `student` / `teacher` are builders
    `fn(num_classes, in_channels=...) -> nn.Module` replacing `run.student` / `run.teacher.arch`. Trials run in
    this process; for several worker processes or Ray, use the command line with the space file."""
    quiet_optuna()
    raw, source = _plain(space)
    name = _study_name(raw)
    given = data is not None or student is not None or teacher is not None
    if given:
        raw = _with_inputs(raw, data, student, teacher, name)
    built = load_space_data(raw, source)
    # The command line reopens a study by its space file: one is written beside the study unless the space is a
    # file already. Before the search only where none is there (a refused search must not replace the file of
    # another space's study); after it, always (it is then this study's).
    space_file = _beside_study(raw, name) / f"{name}-space.yaml" if given or not Path(source).is_file() else None
    if space_file is not None and not space_file.exists():
        _write_space(space_file, raw)
    study = run_search(built, n_trials, timeout_s, storage, confirm=confirm)
    if space_file is not None:
        _write_space(space_file, raw)
        print(f"the command line reopens this study with --space {space_file} (report, dashboard, export)")
    return study


def export(space: str | Path | Mapping[str, Any] | Space, *, data: Data | None = None, student: Builder | None = None,
           teacher: Builder | None = None, trial: int | None = None, epochs: int | None = None,
           out: str | Path | None = None, force: bool = False, storage: str | None = None) -> RunConfig:
    """The confirmed winner's (or trial `trial`'s) run config at the full budget; written as YAML to `out` when
    given, as `search.py export` does. The study's space is the one `search` ran: give the same `data` / `student`
    / `teacher` as there (they are put in the same way), or the `<name>-space.yaml` file `search` wrote."""
    if data is None and student is None and teacher is None:
        built = space if isinstance(space, Space) else load_space(space)
    else:
        raw, source = _plain(space)
        built = load_space_data(_with_inputs(raw, data, student, teacher, _study_name(raw)), source)
    study = open_existing_study(built, storage)
    chosen = select_trial(study, trial, StudyPaths.for_space(built), min_seeds(built)).trial
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
