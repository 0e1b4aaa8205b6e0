"""`search.py report`: a study's plots (Optuna's own matplotlib visualisation), summary, confirmation table and
trials as files, readable without the dashboard. Plots are over the search trials (confirmation runs excluded)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import optuna

from ackd_search.searching.confirm import min_seeds
from ackd_search.searching.confirming import confirmation_results
from ackd_search.searching.record import CONFIRMS, OBJECTIVE, StudyPaths, search_trials
from ackd_search.searching.space import Space
from ackd_search.view.plots import plot_confirmation, plot_search_history
from ackd_search.view.summary import MIN_IMPORTANCE_TRIALS, confirmation_lines, search_only_study, summary


def write_report(study: optuna.Study, out_dir: Path, log: Callable[[str], None] = print,
                 space: Space | None = None) -> list[Path]:
    """Write into `out_dir` and return the files written: trials.csv, summary.txt, confirmation.md and
    confirmation.png (when there are confirmation runs), history.png (the search in trial order), importances.png
    (>= MIN_IMPORTANCE_TRIALS complete search trials) and pareto.png (two objectives). A plot that cannot be drawn
    yet is skipped with a one-line reason through `log`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(out_dir / "trials.csv", lambda p: study.trials_dataframe().to_csv(p, index=False))]
    written.append(_write(out_dir / "summary.txt", lambda p: p.write_text(summary(study, space) + "\n")))
    table = confirmation_lines(study, space)
    if table:
        text = f"# {study.study_name}: confirmation over seeds\n\n```\n" + "\n".join(table) + "\n```\n"
        written.append(_write(out_dir / "confirmation.md", lambda p: p.write_text(text)))
        results = confirmation_results(study, StudyPaths.for_space(space) if space is not None else None)
        seeds = min_seeds(space) if space is not None else 2
        written.append(plot_confirmation(results, out_dir / "confirmation.png", study.study_name, seeds))
    complete = search_trials(study)
    if not complete:
        log("no complete search trial: no plots")
        return written
    searchers = [t for t in study.get_trials(deepcopy=False) if CONFIRMS not in t.user_attrs]
    written.append(plot_search_history(searchers, out_dir / "history.png", study.study_name))
    searched = search_only_study(study, complete)
    names = study.metric_names or [OBJECTIVE] + [f"objective {i}" for i in range(1, len(study.directions))]
    multi = len(study.directions) > 1
    first = {"target": (lambda t: t.values[0]), "target_name": names[0]} if multi else {"target_name": names[0]}
    plots = []
    if len(complete) >= MIN_IMPORTANCE_TRIALS:  # as the summary: fewer would rank parameters by noise
        plots.append(("importances.png", lambda vis: vis.plot_param_importances(searched, **first)))
    else:
        log(f"no importances.png: {len(complete)} complete search trials, importances need {MIN_IMPORTANCE_TRIALS}")
    if multi:
        plots.append(("pareto.png", lambda vis: vis.plot_pareto_front(searched, target_names=names)))
    for name, draw in plots:
        path = _plot(out_dir / name, draw, log)
        if path is not None:
            written.append(path)
    return written


def _write(path: Path, write: Callable[[Path], object]) -> Path:
    write(path)
    return path


def _plot(path: Path, draw, log: Callable[[str], None]) -> Path | None:
    """Draw one of optuna.visualization.matplotlib's plots into a PNG (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    try:
        with warnings.catch_warnings():  # experimental-API and few-trials warnings: the plot is all we want
            warnings.simplefilter("ignore")
            axes = draw(vis)
    except Exception as err:  # e.g. importances when every parameter is still constant
        log(f"skipped {path.name}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}")
        return None
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    figure.set_size_inches(9, 5)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path
