"""The pictures the product writes: a trial's loss terms and validation accuracy per epoch (`loss_terms.png`, a
dashboard artifact), the search in trial order with its running best (`history.png`) and the confirmation per
configuration (`confirmation.png`). Drawn with matplotlib's object API (no pyplot state, no display), so they are
safe in worker processes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from ackd_search.files import write_atomic
from ackd_search.searching.compare import CONFIDENCE, Confirmed, paired_difference, strongest_baseline, winner_of
from ackd_search.searching.record import OBJECTIVE

PLOT_NAME = "loss_terms.png"
_COLUMNS = 3


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _term_groups(history: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """term -> {series label -> values per epoch}: the student's term and the learners' mean of it (weights out)."""
    nan = float("nan")
    names = list(dict.fromkeys(n.split("/", 1)[-1] for h in history for n in h.get("terms", {})
                               if not n.endswith("_w")))
    names.sort(key=lambda n: (n != "loss", n == "adv_d"))  # the total first, the discriminator's own loss last
    groups: dict[str, dict[str, list[float]]] = {}
    for term in names:
        student = [h.get("terms", {}).get(term, nan) for h in history]
        learners = []
        for h in history:
            found = [v for n, v in h.get("terms", {}).items() if "/" in n and n.split("/", 1)[1] == term]
            learners.append(sum(found) / len(found) if found else nan)
        series = {"student": student} if any(math.isfinite(v) for v in student) else {}
        if any(math.isfinite(v) for v in learners):
            series["learners (mean)"] = learners
        groups[term] = series
    return groups


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per loss term (the student solid, the learners' mean dashed; a log axis when the term spans more
    than a factor of 20, so a term that falls from 55 to 5 and one near 0.1 are both readable), and val_acc."""
    epochs = [h["epoch"] for h in history]
    groups = _term_groups(history)
    panels = len(groups) + 1
    rows = math.ceil(panels / _COLUMNS)
    figure = _figure(4.0 * min(panels, _COLUMNS), 2.8 * rows)
    figure.suptitle(f"{title}: loss terms (train mean per epoch) and {OBJECTIVE}")
    axes = figure.subplots(rows, min(panels, _COLUMNS), squeeze=False).flat
    for ax, (term, series) in zip(axes, groups.items()):
        for label, values in series.items():
            ax.plot(epochs, values, "-" if label == "student" else "--", marker=".", label=label)
        finite = [v for values in series.values() for v in values if math.isfinite(v) and v > 0]
        if finite and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
        ax.set(title=term, xlabel="epoch")
        if len(series) > 1:
            ax.legend(fontsize=7)
    accuracy = figure.axes[len(groups)]
    accuracy.plot(epochs, [h["val_acc"] for h in history], marker=".", color="tab:green")
    accuracy.set(title=f"{OBJECTIVE} (%)", xlabel="epoch")
    for ax in figure.axes[panels:]:
        ax.set_visible(False)
    for ax in figure.axes[:panels]:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    write_atomic(path, lambda out: figure.savefig(out, format="png"))  # a full disk leaves no 0-byte plot
    return path


def history_points(trials: list[FrozenTrial]) -> dict[str, tuple[list[int], list[float]]]:
    """What `history.png` draws, in trial order: complete trials, pruned ones at the value where they stopped, and
    the best complete value so far after each complete trial."""
    trials = sorted(trials, key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    best, at, running = -math.inf, [], []
    for t in trials:  # the line runs to the last trial, pruned or not, from the first complete one
        if t.state == TrialState.COMPLETE and t.values:
            best = max(best, t.values[0])
        if best > -math.inf and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            at.append(t.number)
            running.append(best)
    return {"complete": ([t.number for t in done], [t.values[0] for t in done]),
            "pruned": ([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned]),
            "best": (at, running)}


def plot_search_history(trials: list[FrozenTrial], path: Path, title: str) -> Path:
    """The search trials in the order they ran (x: trial number): complete ones filled, pruned ones hollow at the
    value where they stopped, and the best value so far as a step line."""
    points = history_points(trials)
    figure = _figure(9, 4.5)
    ax = figure.subplots()
    ax.plot(*points["complete"], "o", color="tab:blue", label="complete")
    ax.plot(*points["pruned"], "o", mfc="none", color="tab:gray", label="pruned (value when stopped)")
    ax.step(*points["best"], where="post", color="tab:red", label="best so far")
    ax.set(title=f"{title}: search trials in trial order", xlabel="trial number", ylabel=f"{OBJECTIVE} (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers: no 0.5 ticks
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path, format="png")
    return path


def plot_confirmation(results: list[Confirmed], path: Path, title: str, min_seeds: int = 2) -> Path:
    """Left: each configuration's value per seed (dots) and mean (bar). Right: its paired difference to the
    strongest baseline with the interval over seeds and images; the winner in red."""
    best = winner_of(results, min_seeds)
    reference = strongest_baseline(results, other_than=best)
    labels = [c.label for c in results][::-1]
    figure = _figure(11, 0.5 * len(results) + 1.8)
    values, gaps = figure.subplots(1, 2, sharey=True)
    for row, c in enumerate(results[::-1]):
        colour = "tab:red" if best is not None and c.key == best.key else "tab:blue"
        values.plot(list(c.by_seed.values()), [row] * len(c.by_seed), "o", color=colour, alpha=0.6)
        values.plot([c.mean], [row], "|", color=colour, markersize=18, mew=3)
        diff = paired_difference(c, reference) if reference is not None and c.key != reference.key else None
        if diff is not None:
            gaps.errorbar([diff.mean], [row], xerr=[[diff.mean - diff.low], [diff.high - diff.mean]], fmt="o",
                          color=colour, capsize=4)
    values.set_yticks(range(len(labels)), labels)
    values.set(title=f"{title}: {OBJECTIVE} per seed (|: mean)", xlabel=f"{OBJECTIVE} (%)")
    against = reference.label if reference is not None else "no baseline"
    gaps.axvline(0, color="black", linewidth=1)
    gaps.set(title=f"minus {against} (strongest baseline), {round(CONFIDENCE * 100)}% interval", xlabel="points")
    for ax in (values, gaps):
        ax.grid(alpha=0.3)
    figure.savefig(path, format="png")
    return path
