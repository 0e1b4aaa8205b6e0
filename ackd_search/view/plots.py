"""The pictures the product writes: a trial's loss terms and validation accuracy per epoch (`loss_terms.png`, a
dashboard artifact). Drawn with matplotlib's object API (no pyplot state, no display), safe in worker processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ackd_search.searching.record import OBJECTIVE

PLOT_NAME = "loss_terms.png"



def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss terms per epoch (left) and validation accuracy per epoch (right), as a PNG. No pyplot: no global state,
    no display needed, safe in worker processes."""
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    losses, accuracy = figure.subplots(1, 2, width_ratios=(3, 2))
    for label, series, style in _loss_series(history):
        losses.plot(epochs, series, style, marker=".", label=label, linewidth=2.2 if label == "loss" else 1.2)
    losses.set(title=f"{title}: loss terms (train mean)", xlabel="epoch")
    if losses.lines:
        losses.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    accuracy.plot(epochs, [h["val_acc"] for h in history], marker=".", color="tab:green")
    accuracy.set(title=f"{OBJECTIVE} (%)", xlabel="epoch")
    for axes in (losses, accuracy):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.savefig(path, format="png")
    return path


def _loss_series(history: list[dict[str, Any]]) -> list[tuple[str, list[float], str]]:
    """The student's terms (solid) and each learner term averaged over the learners (dashed); weights left out."""
    nan = float("nan")
    student = list(dict.fromkeys(n for h in history for n in h.get("terms", {}) if "/" not in n and
                                 not n.endswith("_w")))
    learner_terms = list(dict.fromkeys(n.split("/", 1)[1] for h in history for n in h.get("terms", {}) if "/" in n))
    series = [(name, [h.get("terms", {}).get(name, nan) for h in history], "-") for name in student]
    for term in learner_terms:
        values = []
        for h in history:
            found = [v for n, v in h.get("terms", {}).items() if "/" in n and n.split("/", 1)[1] == term]
            values.append(sum(found) / len(found) if found else nan)
        series.append((f"learners {term} (mean)", values, "--"))
    return series
