"""The search end to end on tiny digits runs: presets first, pruning, stored attributes and artifacts, resume,
multi-objective, export -> train reproducing the trial, bad storage, and the real optuna-dashboard. The
confirmation stage has its own tests (test_confirm.py); here searches run without it unless a test needs it."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from tiny_space import tiny_space, write

from ackd_search.backends.local import run_search
from ackd_search.config import load_run_config
from ackd_search.errors import StudyError
from ackd_search.models import count_parameters, create_model
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study, quiet_optuna
from ackd_search.view.summary import summary

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

quiet_optuna()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, teacher_cache):
    """One small search, shared by the tests that only read what it stored."""
    tmp = tmp_path_factory.mktemp("search")
    path = write(tmp / "space.yaml", tiny_space(tmp, teacher_cache=teacher_cache, n_trials=7))
    space = load_space(path)
    study = run_search(space, confirm=False)
    return space, study, tmp


def artifact_json(space, trial, filename: str):
    store = optuna.artifacts.FileSystemArtifactStore(space.study.artifacts_dir)
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=optuna.storages.get_storage(space.storage_url))
    meta = next(m for m in metas if m.filename == filename)
    with store.open_reader(meta.artifact_id) as f:
        return json.load(f)


def test_every_trial_finishes_honestly(searched) -> None:
    space, study, _ = searched
    trials = optuna.load_study(study_name=space.study.name, storage=space.storage_url).trials
    assert len(trials) == 7
    assert all(t.state in FINISHED for t in trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2


def test_presets_run_first(searched) -> None:
    space, study, _ = searched
    first, second = study.trials[:2]
    assert first.user_attrs["preset"] == "reference" and first.params["distill.method"] == "ackd"
    assert first.params["distill.ackd.learners_after_stage_2"] == 3  # three learners before the last stage
    assert first.params["distill.ackd.learners_after_stage_1"] == 0
    assert second.user_attrs["preset"] == "kd" and second.params["distill.method"] == "kd"
    assert artifact_json(space, first, "config.json")["distill"]["ackd"]["aux_placements"] == [2, 2, 2]
    assert artifact_json(space, second, "config.json")["distill"]["ce_weight"] == 0.1
    assert "preset" not in study.trials[2].user_attrs


def test_trials_store_what_users_compare(searched) -> None:
    space, study, _ = searched
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 2  # the loop below checks something
    student = create_model("digits_cnn_small", 10, in_channels=1)
    for t in done:
        a = t.user_attrs
        assert a["student_params"] == count_parameters(student)
        assert a["student_flops"] > 0 and 0 < a["teacher_val_acc"] <= 100
        assert a["wall_time_s"] > 0 and a["images_per_s"] > 0
        assert a["device"].startswith("cpu") and a["version"] and a["seed"] == 0
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == t.intermediate_values[4]
        assert "history" not in a and "config" not in a  # large JSON lives in artifacts (MySQL: 64 KB a column)
        history = artifact_json(space, t, "curve.json")
        assert [h["epoch"] for h in history] == [1, 2, 3, 4]
        assert {"ce", "kd", "loss"} <= set(history[0]["terms"])
        config = artifact_json(space, t, "config.json")
        assert a["method"] == config["distill"]["method"]
        assert a["cuda_graphs"] == "off" and a["teacher_output_cache"].startswith(("used", "off"))
        if config["distill"]["method"] == "ackd" and config["distill"]["ackd"]["aux_placements"]:
            assert any(k.startswith("aux1/") for k in history[0]["terms"])
            assert "adv_d" in history[0]["terms"] and "collab" in history[-1]["terms"]


def test_curves_and_best_weights_are_artifacts(searched) -> None:
    space, study, _ = searched
    store = optuna.artifacts.FileSystemArtifactStore(space.study.artifacts_dir)
    best = study.best_trial
    metas = optuna.artifacts.get_all_artifact_meta(best, storage=study._storage)
    names = {m.filename for m in metas}
    assert {"curve.json", "student.pt"} <= names
    weights = next(m for m in metas if m.filename == "student.pt")
    with store.open_reader(weights.artifact_id) as f:
        state = torch.load(f, weights_only=True)
    model = create_model("digits_cnn_small", 10, in_channels=1)
    model.load_state_dict(state)  # strict: only the student survives
    curve = next(m for m in metas if m.filename == "curve.json")
    with store.open_reader(curve.artifact_id) as f:
        assert [row["val_acc"] for row in json.load(f)] == [best.intermediate_values[e] for e in (1, 2, 3, 4)]


def test_finished_trials_leave_no_checkpoint(searched) -> None:
    space, _, _ = searched
    runs = Path(space.study.runs_dir)
    assert list(runs.glob("trial-*/curve.json"))
    assert not list(runs.glob("trial-*/checkpoint.pt"))


def test_summary_lists_best_trials_and_importances(searched) -> None:
    _, study, _ = searched
    text = summary(study)
    assert f"best search trial #{study.best_trial.number}" in text
    assert "top " in text and "val_acc" in text
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 5:
        assert "parameter importances" in text


def test_a_pruner_prunes_a_deliberately_weak_trial(tmp_path: Path, teacher_cache: Path) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=4,
                      pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1})
    data["run"]["distill"]["method"] = "kd"
    space = load_space(write(tmp_path / "s.yaml", data))
    study = open_study(space, make_storage(space))
    good = {"optim.lr": 0.05, "distill.temperature": 4.0}
    for params in (good, good, {"optim.lr": 0.0001, "distill.temperature": 4.0}):
        study.enqueue_trial(params)
    study = run_search(space, n_trials=3, confirm=False)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[1].user_attrs["duplicate_of"] == 0  # the same parameters are not trained twice
    weak = study.trials[2]
    stopped = max(weak.intermediate_values)
    assert stopped < 4  # stopped before the end of its budget
    assert [h["epoch"] for h in artifact_json(space, weak, "curve.json")] == list(range(1, stopped + 1))
    assert weak.user_attrs["prune_reason"].startswith(f"pruned at epoch {stopped}")
    assert weak.user_attrs["student_params"] > 0 and weak.user_attrs["wall_time_s"] > 0
    assert not (Path(space.study.runs_dir) / f"trial-{weak.number:05d}" / "checkpoint.pt").exists()


def test_running_again_resumes_the_same_study(tmp_path: Path, teacher_cache: Path) -> None:
    path = write(tmp_path / "s.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=3))
    first = run_search(load_space(path), confirm=False)
    ids = [t._trial_id for t in first.trials]
    second = run_search(load_space(path), n_trials=2, confirm=False)
    assert len(second.trials) == 5 and [t._trial_id for t in second.trials[:3]] == ids
    assert sum(t.user_attrs.get("preset") == "reference" for t in second.trials) == 1  # presets only once
    assert all(t.state in FINISHED for t in second.trials)


def test_a_different_space_under_the_same_name_is_refused_untouched(tmp_path: Path, teacher_cache: Path) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=1)
    run_search(load_space(write(tmp_path / "a.yaml", data)), confirm=False)
    db = tmp_path / "tiny.db"
    before = sha(db)
    data["run"]["optim"]["lr"]["high"] = 0.5
    with pytest.raises(StudyError, match="created from a different space"):
        run_search(load_space(write(tmp_path / "b.yaml", data)))
    assert sha(db) == before


def test_multi_objective_gives_a_pareto_front(tmp_path: Path, teacher_cache: Path) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=3, second_objective="student_params",
                      pruner={"name": "none"})
    data["run"]["student"] = {"choices": ["digits_cnn_small", "digits_cnn_large"]}
    data["run"]["distill"]["method"] = "kd"
    path = write(tmp_path / "s.yaml", data)
    study = run_search(load_space(path), confirm=False)
    assert len(study.directions) == 2
    assert study.metric_names == ["val_acc", "student_params"]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.best_trials and all(len(t.values) == 2 for t in study.best_trials)
    assert "Pareto front" in summary(study)
    # export needs a chosen Pareto point
    out = tmp_path / "best.yaml"
    cli = _cli("export", "--space", str(path), "--out", str(out))
    assert cli.returncode == 2 and "choose a Pareto point with --trial" in cli.stderr
    number = study.best_trials[0].number
    cli = _cli("export", "--space", str(path), "--out", str(out), "--trial", str(number))
    assert cli.returncode == 0, cli.stderr
    assert load_run_config(out).student == study.best_trials[0].params["student"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "search.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_export_then_train_reproduces_the_trial(tmp_path: Path) -> None:
    # A fresh teacher cache: the first trial trains the teacher, the final training reads it from the cache,
    # and the student must still start from the same weights.
    data = tiny_space(tmp_path, n_trials=2)
    path = write(tmp_path / "s.yaml", data)
    study = run_search(load_space(path), confirm=False)
    best = study.best_trial
    out = tmp_path / "best.yaml"
    cli = _cli("export", "--space", str(path), "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    cfg = load_run_config(out)
    assert cfg.optim.epochs == 4 and cfg.eval_test
    assert cfg.distill.method == best.params["distill.method"]
    assert cfg.distill.temperature == best.params["distill.temperature"]
    run_dir = tmp_path / "final"
    cli = _cli("train", "--config", str(out), "--output-dir", str(run_dir))
    assert cli.returncode == 0, cli.stderr
    assert "test_acc" in cli.stdout
    result = json.loads((run_dir / "result.json").read_text())
    curve = [h["val_acc"] for h in result["history"]]
    assert curve == [best.intermediate_values[e] for e in (1, 2, 3, 4)]
    assert result["test_acc"] is not None


@pytest.mark.parametrize("storage, fragment", [
    ("not a url", "not a valid SQLAlchemy URL"),
    ("postgresql://nobody@127.0.0.1:1/none", "cannot connect"),
    ("sqlite:////no/such/folder/x.db", "does not exist"),
    ("nosuchdialect://x/y", "cannot connect"),
])
def test_bad_storage_is_one_line_and_writes_nothing(tmp_path: Path, storage: str, fragment: str) -> None:
    path = write(tmp_path / "s.yaml", tiny_space(tmp_path, n_trials=1))
    cli = _cli("--space", str(path), "--storage", storage, timeout=60)
    assert cli.returncode == 2
    assert fragment in cli.stderr and cli.stderr.count("\n") == 1, cli.stderr
    assert "Traceback" not in cli.stderr
    assert not (tmp_path / "tiny.db").exists() and not (tmp_path / "teachers").exists()


def test_missing_space_file_exits_nonzero() -> None:
    cli = _cli("--space", "spaces/nope.yaml", timeout=60)
    assert cli.returncode == 2 and "spaces/nope.yaml: file not found" in cli.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_produced_study(searched) -> None:
    space, study, _ = searched
    port = _free_port()
    # Through our own command (which binds 127.0.0.1 unless told otherwise and passes the artifact folder).
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "search.py"), "dashboard", "--space", space.source, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        summaries = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and summaries is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    summaries = json.load(response)["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert summaries is not None, "optuna-dashboard did not answer"
        (entry,) = [s for s in summaries if s["study_name"] == space.study.name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{entry['study_id']}", timeout=5) as r:
            detail = json.load(r)
        assert len(detail["trials"]) == len(study.trials)
        states = {t["state"] for t in detail["trials"]}
        assert states <= {"Complete", "Pruned", "Fail"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
