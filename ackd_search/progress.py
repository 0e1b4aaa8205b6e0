"""What the user sees of a search: a line per finished trial, the running trial's epoch, and the closing summary
(counts, best trials or the Pareto front, parameter importances)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search.objective import OBJECTIVE, one_line
from ackd_search.space import Space


class Progress:
    """Terminal progress: one line per finished trial; the running trial's epoch on a live line when on a tty."""

    def __init__(self, space: Space, stream=None, prefix: str = ""):
        self.space, self.stream, self.prefix = space, stream or sys.stdout, prefix
        self.live = self.stream.isatty()
        self.started: dict[int, float] = {}
        self.epochs = int(space.base.get("optim", {}).get("epochs", 0))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def start(self, number: int, values: dict[str, Any]) -> None:
        self.started[number] = time.perf_counter()

    def epoch(self, number: int, epoch: int, metrics: dict[str, Any]) -> None:
        if self.live:
            total = f"/{self.epochs}" if self.epochs else ""
            self._write(f"\r{self.prefix}  trial {number}: epoch {epoch}{total}  val_acc {metrics['val_acc']:6.2f}   ")

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        counts = state_counts(study)
        elapsed = time.perf_counter() - self.started.pop(trial.number, time.perf_counter())
        value = "" if trial.values is None else "value " + ", ".join(f"{v:.4g}" for v in trial.values)
        reason = trial.user_attrs.get("fail_reason", "")
        preset = trial.user_attrs.get("preset")
        best = best_text(study)
        line = (f"trial {trial.number:>3} {trial.state.name:<8} {value:<18} {elapsed:6.1f}s"
                f"{' [' + preset + ']' if preset else ''}{'  ' + reason if reason else ''}"
                f" | done {counts['COMPLETE']} pruned {counts['PRUNED']} failed {counts['FAIL']} | {best}")
        self._write(("\r" if self.live else "") + self.prefix + line + "\n")



def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts



def best_text(study: optuna.Study) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet"
    if len(study.directions) > 1:
        return f"Pareto front: {len(study.best_trials)} trials"
    best = study.best_trial
    return f"best #{best.number} {best.value:.2f}"



def summary(study: optuna.Study, top: int = 5) -> str:
    """The closing table: counts, the best trials (or the Pareto front), and parameter importances."""
    counts = state_counts(study)
    lines = [f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)]
    from ackd_search.confirm import confirmation_table, search_trials

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
    lines += confirmation_table(study)
    return "\n".join(lines)



def importance_lines(study: optuna.Study, complete: list[FrozenTrial], minimum: int = 5) -> list[str]:
    if len(study.directions) > 1 or len(complete) < minimum:
        return [f"(parameter importances need >= {minimum} complete trials of a single-objective study)"]
    try:
        # Over the search trials alone: confirmation runs have no parameters and would empty the common space.
        search_only = optuna.create_study(directions=study.directions)
        search_only.add_trials(complete)
        with warnings.catch_warnings():  # "few trials in a regime": the ranking below is all we claim
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(search_only)
    except Exception as err:  # e.g. every parameter constant so far
        return [f"(parameter importances unavailable: {one_line(err)})"]
    ranked = list(importances.items())[:8]
    return ["parameter importances (PED-ANOVA):"] + [f"  {v:6.3f}  {k}" for k, v in ranked]



def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
