"""What a trial is, read from its record alone: a search point or a confirmation run, its label, the trial whose run
folder it resumes, its value and its one-line form. Pure functions over finished trials, shared by search and view."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ackd_search.searching.settings import StudySettings

OBJECTIVE = "val_acc"  # the student's validation accuracy (%) after the trial's last epoch; maximised
CONFIRMS = "confirms"  # user attribute of a confirmation run: what it confirms (a preset or a trial's config)
CONFIG_ARTIFACT_ATTR = "config_artifact_id"  # user attribute: the id of the trial's `config.json` artifact
# User attributes a re-queued trial keeps from the one it replaces (requeue after Ctrl-C or SIGTERM).
REQUEUE_KEEPS = ("preset", "preset_sampled", CONFIRMS, "confirm_key", "confirm_seed", "confirm_epochs",
                 "confirm_source")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
CONFIRM_SUFFIX = "-confirm"  # the sibling study holding a search's confirmation runs
CONFIRMS_STUDY = "confirms_study"  # user attribute of that sibling: the search study it confirms
WINNER_ATTR = "confirmed winner"  # search study attribute, its first: shown beside the dashboard's Best Trial


@dataclass
class StudyPaths:
    """Where a study's trials write: per-trial run folders (checkpoints, curves) and the artifact store."""

    runs: Path
    artifacts: Path

    @classmethod
    def for_study(cls, settings: StudySettings) -> StudyPaths:
        return cls(runs=Path(settings.runs_dir or f"studies/{settings.name}-runs"),
                   artifacts=Path(settings.artifacts_dir or f"studies/{settings.name}-artifacts"))

    @classmethod
    def for_space(cls, space: Any) -> StudyPaths:
        """The paths of a `search.space.Space`'s study (its `study` settings)."""
        return cls.for_study(space.study)

    def for_confirmation(self) -> StudyPaths:
        """The confirmation runs' folders (their trial numbers are the sibling study's) and the same artifacts."""
        return StudyPaths(runs=self.runs / "confirm", artifacts=self.artifacts)

    def run_dir(self, root_number: int) -> Path:
        """The run folder of trial `root_number` (a re-run trial uses its original's: `root_trial_number`)."""
        return self.runs / f"trial-{root_number:05d}"


def confirm_study_name(name: str) -> str:
    return name + CONFIRM_SUFFIX


def is_confirmation(trial: FrozenTrial) -> bool:
    return CONFIRMS in trial.user_attrs


def root_trial_number(frozen: FrozenTrial) -> int:
    """A re-run trial (after a worker died or a Ctrl-C) shares its original's run folder, so it resumes the
    original's last epoch checkpoint instead of starting over."""
    if "retry_of" in frozen.user_attrs:
        return int(frozen.user_attrs["retry_of"])
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return original if original is not None else frozen.number


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("interrupted"))


def search_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete search trials (not confirmation runs, not duplicates), best first by the first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not is_confirmation(t) and "duplicate_of" not in t.user_attrs]
    return sorted(done, key=lambda t: -t.values[0])


def trial_label(attrs: dict[str, Any]) -> str:
    """What a trial is besides a sampled point: a confirmation run, a preset, a duplicate, a resumed run."""
    parts = []
    if CONFIRMS in attrs:
        parts.append(f"confirm {attrs[CONFIRMS]} seed {attrs.get('confirm_seed', '?')}")
    elif attrs.get("preset"):
        parts.append(str(attrs["preset"]))
    if "duplicate_of" in attrs:
        parts.append(f"= #{attrs['duplicate_of']}")
    if "retry_of" in attrs:
        parts.append(f"resumes #{attrs['retry_of']}")
    return ", ".join(parts)


def bracket(label: str) -> str:
    return f" [{label}]" if label else ""


def value_text(trial: FrozenTrial) -> str:
    """`97.92` (val_acc), then a second objective with 4 significant digits; `-` without a value."""
    if trial.values is None:
        return "-"
    return ", ".join([f"{trial.values[0]:.2f}"] + [f"{v:.4g}" for v in trial.values[1:]])


def trial_method(trial: FrozenTrial, fallback: str = "") -> str:
    return str(trial.user_attrs.get("method") or trial.params.get("distill.method") or fallback)


def trial_line(trial: FrozenTrial, counter: str, seconds: float, method: str = "") -> str:
    """`trial  1/20 #0    COMPLETE   97.92   11.9s ackd [reference]`: the finished trial in one line."""
    return (f"trial {counter:>7} #{trial.number:<4} {trial.state.name:<8} {value_text(trial):>7} {seconds:6.1f}s "
            f"{trial_method(trial, method):<4} {bracket(trial_label(trial.user_attrs)).strip():<26}")


def stop_reason(trial: FrozenTrial) -> str:
    return trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason") or ""
