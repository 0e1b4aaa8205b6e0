"""A digits search space small enough for tests: a few hundred images, a few epochs, tiny nets (shared by the
search, fault-tolerance and Ray tests)."""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from pathlib import Path
from typing import Any

import yaml


def tiny_space(tmp_path: Path, name: str = "tiny", teacher_cache: Path | None = None,
               storage: str | None = None, **study: Any) -> dict[str, Any]:
    """Plain data for a space file whose study, runs and artifacts all live under `tmp_path`."""
    return {
        "study": {
            "name": name,
            "storage": storage or f"sqlite:///{tmp_path / (name + '.db')}",
            "n_trials": 4,
            "sampler": {"name": "tpe", "n_startup_trials": 2},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
            "runs_dir": str(tmp_path / f"{name}-runs"),
            "artifacts_dir": str(tmp_path / f"{name}-artifacts"),
            "heartbeat_interval_s": 1,
            "grace_period_s": 3,
            **study,
        },
        "run": {
            "seed": 0,
            "student": "digits_cnn_small",
            "data": {"name": "digits", "val_fraction": 0.2, "limit": 400},
            "optim": {"epochs": 4, "batch_size": 64, "lr": {"low": 0.0001, "high": 0.1, "log": True}},
            "teacher": {"arch": "digits_cnn_large", "optim": {"epochs": 6},
                        "cache_dir": str(teacher_cache or tmp_path / "teachers")},
            "distill": {
                "method": {"choices": ["ackd", "kd"]},
                "temperature": {"low": 1.0, "high": 8.0},
                "ackd": {"adv_weight": {"low": 0.001, "high": 1.0, "log": True},
                         "aggregation": {"choices": ["attention", "mean"]}},
            },
        },
        "learners": {"max_per_stage": 3, "max_total": 3},
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def variant(data: dict[str, Any], **study: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    out["study"].update(study)
    return out


def stored_epochs(db: Path) -> int:
    """Intermediate values stored so far in an SQLite study file, read without writing anything (opening it with
    Optuna while a search is creating it would race the search in creating the tables); 0 while it is not there."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()[0])
    except sqlite3.Error:
        return 0


def interrupted_at_epoch(monkeypatch, epoch: int, when=lambda reporter: True):
    """Make the search's per-epoch reporter raise KeyboardInterrupt (as SIGINT does) after `epoch` is reported, for
    the first trial `when(reporter)` accepts; use as `with interrupted_at_epoch(...):` around the interrupted run."""
    import contextlib

    import ackd_search.searching.objective as objective_module

    real_call = objective_module.OptunaReporter.__call__
    fired = []

    def stop(self, reached, metrics):
        real_call(self, reached, metrics)
        if reached == epoch and not fired and when(self):
            fired.append(self.trial.number)
            raise KeyboardInterrupt("signal 2")

    @contextlib.contextmanager
    def patched():
        monkeypatch.setattr(objective_module.OptunaReporter, "__call__", stop)
        try:
            yield fired
        finally:
            monkeypatch.undo()

    return patched()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`search.py argv` in this process: its exit code and what it printed."""
    from ackd_search.cli import main

    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err
