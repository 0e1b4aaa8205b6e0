"""What the search tells whoever watches it (the terminal's progress, the dashboard's notes): a set of calls, each a
no-op here, that the caller of the search hands in. The search never imports what draws or prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ackd_search.searching.record import StudyPaths
from ackd_search.training import Reporter


class SearchHooks:
    """Subclass and override what you watch; the search calls every method, and none may decide a trial's fate."""

    def phase_started(self, study: optuna.Study, total: int | None, timeout_s: float | None) -> None:
        """A run of trials begins (`total` of them at most, for up to `timeout_s`)."""

    def trial_started(self, number: int, values: dict[str, Any]) -> None:
        """Trial `number` starts training with the sampled `values` (empty for a confirmation run)."""

    def epoch(self, number: int, epoch: int, metrics: dict[str, Any]) -> None:
        """Trial `number` finished `epoch` (1-based) with `metrics` (val_acc, loss terms, ...)."""

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Trial `trial` has its final state (Optuna's optimize callback)."""

    def trial_recorded(self, trial: optuna.Trial, history: list[dict[str, Any]], config: dict[str, Any],
                       run_dir: Path, paths: StudyPaths) -> None:
        """The trial's curve and config are stored: the moment for its dashboard note."""

    def confirmation_done(self, search: optuna.Study, confirm: optuna.Study) -> None:
        """The confirmation runs (trials of `confirm`, the sibling of `search`) are all finished."""

    def teacher_progress(self, description: str, epochs: int) -> Reporter | None:
        """A reporter for the teacher's training epochs, or None to train it silently."""
        return None


QUIET = SearchHooks()
