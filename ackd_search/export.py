"""Export a trial of a study (the best, a chosen one, or a Pareto point) as a complete run config YAML.

Parameter names are config paths, so a trial's params map straight back onto the space's fixed run config."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search import __version__
from ackd_search.config import RunConfig, save_run_config
from ackd_search.space import Space
from ackd_search.study import StudyError, existing_study, make_storage, safe_url


def load_existing_study(space: Space, storage_url: str | None = None) -> optuna.Study:
    storage = make_storage(space, storage_url)
    study = existing_study(storage, space.study.name)
    if study is None:
        raise StudyError(f"no study {space.study.name!r} in {safe_url(storage.url)}; run the search first")
    return study


def select_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match:
            raise StudyError(f"study {study.study_name!r} has no trial #{number}")
        if match[0].state != TrialState.COMPLETE:
            raise StudyError(f"trial #{number} is {match[0].state.name}; only COMPLETE trials can be exported")
        return match[0]
    if not complete:
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial to export")
    if len(study.directions) == 1:
        return study.best_trial
    front = ", ".join(f"#{t.number} ({t.values[0]:.2f}, {t.values[1]:.4g})" for t in study.best_trials)
    raise StudyError(f"multi-objective study: choose a Pareto point with --trial N; front: {front}")


def export_config(space: Space, trial: FrozenTrial, epochs: int | None = None) -> RunConfig:
    """The trial's complete run config, for the full budget (`epochs`, else `study.final_epochs`, else the trial's)."""
    cfg = space.run_config(trial.params)
    cfg.optim.epochs = epochs or space.study.final_epochs or cfg.optim.epochs
    cfg.eval_test = True
    return cfg


def write_export(space: Space, study: optuna.Study, trial: FrozenTrial, out: Path, epochs: int | None) -> RunConfig:
    cfg = export_config(space, trial, epochs)
    out.parent.mkdir(parents=True, exist_ok=True)
    values = ", ".join(f"{v:.4g}" for v in trial.values)
    header = (f"# exported by ackd-search {__version__} on {time.strftime('%Y-%m-%d %H:%M')}\n"
              f"# study {study.study_name!r}, trial #{trial.number} (values {values}; trial budget "
              f"{space.run_config(trial.params).optim.epochs} epochs, this config {cfg.optim.epochs})\n"
              f"# train it with: python search.py train --config {out}")
    save_run_config(cfg, out, header=header)
    return cfg
