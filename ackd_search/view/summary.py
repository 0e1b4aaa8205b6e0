"""The closing summary of a study: counts by state, the best search trials (or the Pareto front), the best trial's
parameters, parameter importances over the search trials alone, and the confirmation table."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search.errors import one_line
from ackd_search.searching.confirm import min_seeds
from ackd_search.searching.confirming import confirmation_results
from ackd_search.searching.record import CONFIRMS, OBJECTIVE, StudyPaths, confirm_study_name, search_trials
from ackd_search.searching.space import Space
from ackd_search.view.tables import confirmation_table


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


def best_text(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> str:
    """The best SEARCH trial (a confirmation run retrains a candidate with another seed: not a new point)."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE and CONFIRMS not in t.user_attrs
                and "duplicate_of" not in t.user_attrs]
    if not complete:
        return "no complete trial yet"
    if len(study.directions) > 1:
        return f"Pareto front: {len(study.best_trials)} trials"
    best = max(complete, key=lambda t: t.values[0])
    return f"best #{best.number} {best.values[0]:.2f}"


def confirmation_lines(study: optuna.Study, space: Space | None = None) -> list[str]:
    """The confirmation table of `study` (its sibling study's runs), empty when nothing is confirmed yet; with
    `space`, its per-image records and its seed count are read too."""
    paths = StudyPaths.for_space(space) if space is not None else None
    results = confirmation_results(study, paths)
    return confirmation_table(results, min_seeds(space) if space is not None else 2,
                              confirm_study_name(study.study_name))


def summary(study: optuna.Study, space: Space | None = None, top: int = 5) -> str:
    """The closing table: counts, the best trials (or the Pareto front), importances, the confirmation."""
    counts = state_counts(study)
    lines = [f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)]
    complete = search_trials(study)
    if not complete:
        return "\n".join(lines + ["no complete trial"])
    multi = len(study.directions) > 1
    chosen = sorted(study.best_trials, key=lambda t: -t.values[0]) if multi else complete[:top]
    lines.append("Pareto front (val_acc ↑, cost ↓):" if multi else f"top {len(chosen)} trials by {OBJECTIVE}:")
    lines.append(f"  {'#':>4} {'val_acc':>8} {'params':>9} {'MFLOPs':>9} {'time_s':>7}  preset")
    for t in chosen:
        a = t.user_attrs
        lines.append(f"  {t.number:>4} {t.values[0]:>8.2f} {a.get('student_params', 0):>9,} "
                     f"{a.get('student_flops', 0) / 1e6:>9.2f} {a.get('wall_time_s', math.nan):>7.1f}  "
                     f"{a.get('preset', '')}")
    if not multi:
        best = complete[0]
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        lines.append(f"best search trial #{best.number}: {params}")
    lines += importance_lines(study, complete)
    lines += confirmation_lines(study, space)
    return "\n".join(lines)


def search_only_study(study: optuna.Study, complete: list[FrozenTrial]) -> optuna.Study:
    """An in-memory copy holding only the complete search trials: confirmation runs have no parameters and would
    empty the common search space of importance tools and plots."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(sorted(complete, key=lambda t: t.number))  # in the order they ran
    if study.metric_names:
        with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            copy.set_metric_names(study.metric_names)
    return copy


MIN_IMPORTANCE_TRIALS = 5  # fewer complete trials rank parameters by noise: neither the summary nor the plot shows it


def importance_lines(study: optuna.Study, complete: list[FrozenTrial],
                     minimum: int = MIN_IMPORTANCE_TRIALS) -> list[str]:
    if len(study.directions) > 1 or len(complete) < minimum:
        return [f"(parameter importances need >= {minimum} complete trials of a single-objective study)"]
    try:
        with warnings.catch_warnings():  # "few trials in a regime": the ranking below is all we claim
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(search_only_study(study, complete))
    except Exception as err:  # e.g. every parameter constant so far
        return [f"(parameter importances unavailable: {one_line(err)})"]
    ranked = list(importances.items())[:8]
    return ["parameter importances (PED-ANOVA):"] + [f"  {v:6.3f}  {k}" for k, v in ranked]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
