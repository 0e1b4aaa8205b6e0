"""The dashboard as a user sees it, through optuna-dashboard's own HTTP API served in-process: a study opened by
the search names its objective `val_acc`, and an annotated trial carries its note and its loss-terms image."""

from __future__ import annotations

import json
import threading
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard
import pytest
from tiny_space import tiny_space, write

from ackd_search.searching.record import StudyPaths
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study, quiet_optuna
from ackd_search.view.notes import annotate_trial
from ackd_search.view.plots import PLOT_NAME

quiet_optuna()


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no access log in the test output
        pass


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, optuna.Study, StudyPaths]]:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    storage = make_storage(space, space.storage_url)
    study = open_study(space, storage, log=lambda text: None)
    paths = StudyPaths.for_space(space)
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    app = optuna_dashboard.wsgi(storage, artifact_store=optuna.artifacts.FileSystemArtifactStore(paths.artifacts))
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", study, paths
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def study_id(base: str, name: str) -> int:
    summaries = get(f"{base}/api/studies")["study_summaries"]
    return next(s["study_id"] for s in summaries if s["study_name"] == name)


def test_the_dashboard_names_the_objective_val_acc(served) -> None:
    base, study, _ = served
    detail = get(f"{base}/api/studies/{study_id(base, study.study_name)}")
    assert detail["objective_names"] == ["val_acc"]


def test_the_dashboard_shows_a_trials_note_and_its_loss_terms_image(served, tmp_path: Path) -> None:
    base, study, paths = served
    with warnings.catch_warnings():  # "heartbeat is meant for optimize": this test asks and tells by hand
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    history = [{"epoch": e, "val_acc": 80.0 + e, "val_loss": 1.0 / e, "lr": 0.05, "images_per_s": 1000.0,
                "terms": {"loss": 2.0 / e, "ce": 1.0 / e, "kd": 1.0 / e}} for e in (1, 2, 3)]
    config = {"student": "digits_cnn_small", "teacher": {"arch": "digits_cnn_large"},
              "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, "schedule": "step"},
              "distill": {"method": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}}
    annotate_trial(trial, history, config, tmp_path / "run", paths)
    study.tell(trial, 83.0)
    detail = get(f"{base}/api/studies/{study_id(base, study.study_name)}")
    shown = next(t for t in detail["trials"] if t["number"] == trial.number)
    assert shown["note"]["body"].startswith(f"### Trial {trial.number} · kd · val_acc 83.00 after epoch 3")
    assert "| `distill.temperature` | 4 |" in shown["note"]["body"]
    image = next(a for a in shown["artifacts"] if a["filename"] == PLOT_NAME)
    assert image["mimetype"] == "image/png"
    with urllib.request.urlopen(f"{base}/artifacts/{study._study_id}/{shown['trial_id']}/{image['artifact_id']}",
                                timeout=30) as response:
        assert response.read()[:4] == b"\x89PNG"
