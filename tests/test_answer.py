"""The answer holds up (#17): one winner everywhere (the dashboard's best trial is the search's, the confirmation
lives in `<study>-confirm` and the study page states the winner), history in trial order, no silent fall-back
(export names what it exports and why, train --epochs, a busy dashboard port), notices above the live bar, and any
number of `confirm` processes run only confirmation runs."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState, create_trial
from tiny_space import run_cli, tiny_space, write

from ackd_search.backends.local import run_search
from ackd_search.config import load_run_config
from ackd_search.notices import notice
from ackd_search.searching.confirm import confirmation_runs
from ackd_search.searching.confirming import open_confirmation_if_any
from ackd_search.searching.record import CONFIRMS, confirm_study_name
from ackd_search.searching.space import load_space
from ackd_search.searching.study import open_existing_study, quiet_optuna
from ackd_search.view.plots import history_points
from ackd_search.view.progress import EpochBar

ROOT = Path(__file__).resolve().parent.parent
quiet_optuna()


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, optuna.Study]:
    tmp = tmp_path_factory.mktemp("answer")
    data = tiny_space(tmp, n_trials=3, confirm={"top_k": 1, "seeds": 2, "epochs": 2, "presets": ["kd"]})
    path = write(tmp / "space.yaml", data)
    return path, run_search(load_space(path), stream=io.StringIO())


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_the_dashboard_reports_the_searchs_best_trial_and_the_confirmation_elsewhere(searched) -> None:
    _, study = searched
    app = optuna_dashboard.wsgi(study._storage)
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        summaries = {s["study_name"]: s for s in _get(f"{base}/api/studies")["study_summaries"]}
        assert set(summaries) == {study.study_name, confirm_study_name(study.study_name)}
        detail = _get(f"{base}/api/studies/{summaries[study.study_name]['study_id']}")
        best_search = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        assert [t["number"] for t in detail["best_trials"]] == [best_search.number]
        assert not any("confirms" in json.dumps(t["user_attrs"]) for t in detail["trials"])
        shown = {a["key"]: a["value"] for a in detail["user_attrs"]}  # the table beside Best Trial
        assert shown["confirmed winner"].startswith("winner: ")
        assert shown["confirmation study"] == confirm_study_name(study.study_name)
        confirm = _get(f"{base}/api/studies/{summaries[confirm_study_name(study.study_name)]['study_id']}")
        assert confirm["trials"] and all("confirms" in json.dumps(t["user_attrs"]) for t in confirm["trials"])
        assert confirm["objective_names"] == ["val_acc"]  # the confirmation's axis is named as the search's
    finally:
        server.shutdown()
        server.server_close()


def test_history_points_are_in_trial_order_with_the_running_best() -> None:
    trials = [create_trial(value=v, params={}, distributions={}) for v in (90.0, 95.0, 93.0, 97.0)]
    for number, trial in enumerate(trials):
        trial.number = number
    shuffled = [trials[2], trials[0], trials[3], trials[1]]  # e.g. best first, as a rank plot would order them
    points = history_points(shuffled)
    assert points["complete"] == ([0, 1, 2, 3], [90.0, 95.0, 93.0, 97.0])
    assert points["best"] == ([0, 1, 2, 3], [90.0, 95.0, 95.0, 97.0])
    last = create_trial(state=TrialState.PRUNED, params={}, distributions={}, intermediate_values={3: 50.0})
    last.number = 4
    assert history_points(trials + [last])["best"] == ([0, 1, 2, 3, 4], [90.0, 95.0, 95.0, 97.0, 97.0])


def test_export_without_a_confirmed_winner_names_what_it_exports_and_why(tmp_path: Path, capsys) -> None:
    data = tiny_space(tmp_path, n_trials=2, confirm={"top_k": 1, "seeds": 2, "epochs": 2})
    path = write(tmp_path / "space.yaml", data)
    run_search(load_space(path), stream=io.StringIO(), confirm=False)
    code, out, err = run_cli(["export", "--space", str(path), "--out", str(tmp_path / "best.yaml")], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("exporting "))
    assert "not a confirmed winner" in line and "no confirmation runs yet" in line and "search.py confirm" in line


def test_train_takes_epochs(tmp_path: Path, capsys) -> None:
    data = tiny_space(tmp_path)
    cfg = load_space(write(tmp_path / "space.yaml", data)).run_config({})
    config = tmp_path / "run.yaml"
    from ackd_search.config import save_run_config

    save_run_config(cfg, config)
    code, out, err = run_cli(["train", "--config", str(config), "--epochs", "2", "--output-dir",
                              str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/2", "2/2"]
    assert load_run_config(config).optim.epochs == 4  # the file keeps its own budget


def test_a_busy_dashboard_port_is_one_line_and_exit_2(searched, capsys) -> None:
    path, _ = searched
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli(["dashboard", "--space", str(path), "--port", str(port)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"127.0.0.1:{port}" in err and "--port" in err and "Traceback" not in err


def test_notices_land_above_the_live_bar_never_inside_it(capsys) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = EpochBar("teacher digits_cnn_large", 4, stream=Terminal())
    bar(1, {"val_acc": 50.0})
    notice("teacher output cache: computing 1,000 views")
    bar(2, {"val_acc": 60.0})
    bar.close()
    err = capsys.readouterr().err
    assert "ackd-search: teacher output cache: computing 1,000 views\n" in err
    assert not any(line.startswith(("0/4", "1/4", "2/4")) and "ackd-search" in line for line in err.split("\r"))


def test_four_confirm_processes_run_only_confirmation_runs_and_stop(searched, tmp_path: Path) -> None:
    path, study = searched
    space = load_space(path)
    search_before = len(study.trials)
    # Four more seeds for every candidate: the four processes share 2 configurations x 4 new runs.
    data = json.loads(json.dumps(space.raw))
    data["study"]["confirm"]["seeds"] = 4
    wider = write(tmp_path / "wider.yaml", data)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "search.py"), "confirm", "--space", str(wider)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    study = open_existing_study(space)
    assert len(study.trials) == search_before  # no search trial started
    runs = confirmation_runs(study, open_confirmation_if_any(study))
    done = [(t.user_attrs[CONFIRMS], t.user_attrs["confirm_seed"]) for t in runs if t.state == TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 2 * 4  # every configuration x seed once, none twice
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in runs)
