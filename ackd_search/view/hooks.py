"""The watchers a search is handed on a user's machine: the terminal's progress lines (`progress.Progress`, one per
run of trials), the teacher's epoch bar, and the dashboard's notes on every trial and on the study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ackd_search.searching.confirm import min_seeds
from ackd_search.searching.hooks import SearchHooks
from ackd_search.searching.record import StudyPaths
from ackd_search.searching.space import Space
from ackd_search.training import Reporter
from ackd_search.view.notes import annotate_study, annotate_trial
from ackd_search.view.progress import EpochBar, Progress


class UserView(SearchHooks):
    """Progress on `stream` (stdout by default; `tag` prefixes a local worker's lines) and dashboard notes."""

    def __init__(self, space: Space, stream=None, tag: str = ""):
        self.space, self.stream, self.prefix = space, stream, f"[{tag}] " if tag else ""
        self.costs: dict[str, list[float]] = {}  # seconds per epoch by method, learnt in one phase, used in the next
        self.progress = Progress(space, stream, self.prefix, costs=self.costs)

    def phase_started(self, study: optuna.Study, total: int | None, timeout_s: float | None) -> None:
        self.progress = Progress(self.space, self.stream, self.prefix, study=study, total=total, timeout_s=timeout_s,
                                 costs=self.costs)

    def trial_started(self, number: int, values: dict[str, Any]) -> None:
        self.progress.start(number, values)

    def epoch(self, number: int, epoch: int, metrics: dict[str, Any]) -> None:
        self.progress.epoch(number, epoch, metrics)

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.progress.trial_done(study, trial)

    def trial_recorded(self, trial: optuna.Trial, history: list[dict[str, Any]], config: dict[str, Any],
                       run_dir: Path, paths: StudyPaths) -> None:
        annotate_trial(trial, history, config, run_dir, paths)

    def confirmation_done(self, search: optuna.Study, confirm: optuna.Study) -> None:
        annotate_study(search, confirm, StudyPaths.for_space(self.space), min_seeds(self.space))

    def teacher_progress(self, description: str, epochs: int) -> Reporter:
        return EpochBar(description, epochs, self.stream)
