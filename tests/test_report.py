"""`report` and the dashboard's per-trial view, on a tiny finished study: the files `write_report` writes, the
note and loss-term plot every finished trial carries, and what the search printed (plain lines off a terminal)."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from optuna_dashboard import get_note
from optuna_dashboard._note import get_note_from_system_attrs
from tiny_space import tiny_space, write

from ackd_search.backends.local import run_search
from ackd_search.cli import main
from ackd_search.searching.confirming import open_confirmation_if_any
from ackd_search.searching.record import StudyPaths, search_trials
from ackd_search.searching.space import load_space
from ackd_search.searching.study import quiet_optuna
from ackd_search.view.notes import annotate_study
from ackd_search.view.plots import PLOT_NAME
from ackd_search.view.report import write_report

quiet_optuna()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, optuna.Study, str]:
    tmp = tmp_path_factory.mktemp("report")
    data = tiny_space(tmp, n_trials=3, confirm={"top_k": 1, "seeds": 2, "epochs": 2, "presets": ["kd"]})
    path = write(tmp / "space.yaml", data)
    printed = io.StringIO()
    study = run_search(load_space(path), stream=printed)
    return path, study, printed.getvalue()


def test_report_writes_plots_tables_and_a_csv_row_per_trial(finished, tmp_path: Path) -> None:
    _, study, _ = finished
    said = []
    written = write_report(study, tmp_path / "out", log=said.append)
    names = {p.name for p in written}
    assert {"trials.csv", "summary.txt", "confirmation.md", "confirmation.png", "history.png"} <= names
    # 3 complete trials rank parameters by noise: no importances plot, as the summary prints none, and it says why
    assert "importances.png" not in names and any("importances need 5" in line for line in said)
    assert "pareto.png" not in names  # one objective
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written if p.suffix == ".png")
    with open(tmp_path / "out" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(study.trials) and "value_val_acc" in rows[0]
    assert "confirmation over seeds" in (tmp_path / "out" / "confirmation.md").read_text()


def test_report_command_writes_into_out_and_lists_the_files(finished, tmp_path: Path, capsys) -> None:
    space_file, _, _ = finished
    assert main(["report", "--space", str(space_file), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'r' / 'trials.csv'}" in out and (tmp_path / "r" / "history.png").is_file()


def test_every_trained_trial_has_a_note_and_a_loss_terms_png(finished) -> None:
    space_file, study, _ = finished
    storage = study._storage
    system_attrs = storage.get_study_system_attrs(study._study_id)
    trained = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    assert trained
    for trial in trained:
        note = get_note_from_system_attrs(system_attrs, trial._trial_id)["body"]
        assert note.startswith(f"### Trial {trial.number} · ") and "| `optim.lr` |" in note
        assert "Loss terms at epoch" in note and "| student |" in note
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=storage)
        assert any(m.filename == PLOT_NAME and m.mimetype == "image/png" for m in metas)
        assert "note_error" not in trial.user_attrs


def test_the_search_printed_plain_lines_with_k_of_n_and_labelled_confirmations(finished) -> None:
    _, _, printed = finished
    assert "\r" not in printed
    lines = [line for line in printed.splitlines() if line.startswith("trial ")]
    assert any("1/3" in line for line in lines) and any("3/3" in line for line in lines)
    assert any("[confirm kd seed 1]" in line for line in lines)
    assert all(" | complete " in line and " eta " in line for line in lines)


def test_the_study_note_tells_search_trials_from_confirmation_runs(finished) -> None:
    space_file, study, _ = finished
    annotate_study(study, open_confirmation_if_any(study), StudyPaths.for_space(load_space(space_file)))
    note = get_note(study)
    assert note.startswith(f"### {study.study_name}\n\n**Confirmed winner: ")  # the answer first
    assert f"Best search trial (one seed): #{search_trials(study)[0].number}" in note
    assert "confirmation over seeds" in note and f"study `{study.study_name}-confirm`" in note


def test_a_two_objective_study_gets_its_pareto_front_named_by_its_metrics(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_acc", "student_params"])
    lr = {"optim.lr": FloatDistribution(1e-3, 1.0)}
    for i, (acc, params) in enumerate([(90.0, 5000.0), (92.0, 3000.0), (95.0, 6000.0), (91.0, 1000.0)]):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[acc, params],
                                     params={"optim.lr": 0.01 * (i + 1)}, distributions=lr))
    names = {p.name for p in write_report(study, tmp_path, log=lambda text: None)}
    assert {"trials.csv", "summary.txt", "history.png", "pareto.png"} <= names and "confirmation.md" not in names
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_importances_are_plotted_from_five_complete_trials(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("optim.lr", 0.01, 0.1) * 100 + t.suggest_int("k", 0, 3), n_trials=5)
    written = write_report(study, tmp_path / "out", log=lambda text: None)
    assert "importances.png" in {p.name for p in written}
    assert (tmp_path / "out" / "importances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
