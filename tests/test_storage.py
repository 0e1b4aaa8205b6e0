"""The storage under simultaneous starters and bad files: any number of processes may create one study at the same
moment (SQLite and PostgreSQL) and all run their trials; a corrupt database fails in one line before any data is
read or teacher trained; long curves do not grow the trial's attributes (MySQL keeps 64 KB in a Text column)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from test_workers import SERVERS, reachable_or_skip
from tiny_space import interrupted_at_epoch, tiny_space, write

from ackd_search.errors import StudyError
from ackd_search.searching.artifacts import upload_curve
from ackd_search.searching.objective import OptunaReporter
from ackd_search.searching.record import StudyPaths
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import check_storage, make_storage
from ackd_search.searching.study import open_study, quiet_optuna

ROOT = Path(__file__).resolve().parent.parent
quiet_optuna()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def start_searches(space_file: Path, count: int, n_trials: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "search.py"), "--space", str(space_file), "--n-trials", str(n_trials),
           "--no-confirm"]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
            for _ in range(count)]


@pytest.fixture()
def fresh_postgres():
    """A new, empty PostgreSQL database: the schema race needs tables that do not exist yet."""
    reachable_or_skip(SERVERS["postgresql"])
    name = f"ackd_race_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(SERVERS["postgresql"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield SERVERS["postgresql"].rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_simultaneous_starters_all_run_their_trials(tmp_path: Path, teacher_cache: Path, backend: str,
                                                    request) -> None:
    storage = request.getfixturevalue("fresh_postgres") if backend == "postgresql" else None
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, storage=storage, n_trials=2)
    data["run"]["optim"]["epochs"] = 2
    space_file = write(tmp_path / "space.yaml", data)
    procs = start_searches(space_file, count=3, n_trials=2)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
    study = optuna.load_study(study_name="tiny", storage=data["study"]["storage"])
    trials = study.trials
    assert len(trials) == 6  # every starter ran its two trials, none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    presets = [t.user_attrs.get("preset") for t in trials]
    assert presets.count("reference") == 1 and presets.count("kd") == 1  # queued once, each run by one starter
    assert sum("created study" in out for out in outputs) == 1


def test_a_corrupt_sqlite_file_fails_before_any_work(tmp_path: Path) -> None:
    data = tiny_space(tmp_path)
    space_file = write(tmp_path / "space.yaml", data)
    (tmp_path / "tiny.db").write_bytes(b"this is not a database" * 100)
    cli = subprocess.run([sys.executable, str(ROOT / "search.py"), "--space", str(space_file)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert "not a usable SQLite database" in cli.stderr and cli.stderr.count("\n") == 1, cli.stderr
    assert not (tmp_path / "teachers").exists()  # no teacher was trained, no data read


def test_a_folder_in_place_of_the_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.db").mkdir()
    with pytest.raises(StudyError, match="is a folder"):
        check_storage(f"sqlite:///{tmp_path / 'x.db'}")


def test_a_200_epoch_curve_with_four_learners_stores_on_mariadb(tmp_path: Path) -> None:
    url = SERVERS["mysql"]
    reachable_or_skip(url)
    name = f"long-{uuid.uuid4().hex[:8]}"
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, name=name, storage=url, presets=False)))
    study = open_study(space, make_storage(space), log=lambda _: None)
    try:
        trial = study.ask()
        reporter = OptunaReporter(trial, can_prune=False)
        terms = {f"aux{i}/{k}": 0.123456 for i in range(1, 5) for k in ("ce", "kd", "collab", "adv_g")}
        for epoch in range(1, 201):
            reporter(epoch, {"epoch": epoch, "val_acc": 50.0 + epoch / 10, "val_loss": 1.0, "lr": 0.05,
                             "images_per_s": 1000.0, "train_s": 1.0, "terms": {**terms, "loss": 1.0}})
        paths = StudyPaths.for_space(space)
        upload_curve(trial, reporter.history, tmp_path / "run", paths)
        study.tell(trial, 70.0)
        stored = optuna.load_study(study_name=name, storage=url).trials[0]
        assert stored.state == TrialState.COMPLETE and len(stored.intermediate_values) == 200
        assert all(len(json.dumps(v)) < 4096 for v in stored.user_attrs.values())  # nothing grows per epoch
        assert len(json.loads((tmp_path / "run" / "curve.json").read_text())) == 200
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_a_deleted_studys_checkpoint_is_never_resumed(tmp_path: Path, teacher_cache: Path, monkeypatch) -> None:
    """Run folders are named by trial number: a new study under the same name must not resume the old one's."""
    from ackd_search.backends.local import run_search

    data = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=1)
    space = load_space(write(tmp_path / "space.yaml", data))
    with interrupted_at_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run_search(space, confirm=False)
    run_dir = tmp_path / "tiny-runs" / "trial-00000"
    assert (run_dir / "checkpoint.pt").exists()
    (tmp_path / "tiny.db").unlink()  # the user deletes the study and starts again
    study = run_search(load_space(space.source), confirm=False)
    first = study.trials[0]
    assert "resumed_from_epoch" not in first.user_attrs
    assert "not resumed" in first.user_attrs["foreign_checkpoint"]
    assert sorted(first.intermediate_values) == [1, 2, 3, 4]  # trained from scratch
    assert list(run_dir.glob("checkpoint.foreign-*.pt"))


def test_an_interrupted_preset_is_requeued_with_its_label_and_resumes(tmp_path: Path, teacher_cache: Path,
                                                                      monkeypatch) -> None:
    import io

    from ackd_search.backends.local import run_search

    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache,
                                                                 n_trials=1)))
    with interrupted_at_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run_search(space, confirm=False)
    out = io.StringIO()
    study = run_search(space, n_trials=1, confirm=False, stream=out)  # the queued KD preset, then the re-run (free)
    first, rerun = study.trials[0], study.trials[-1]
    assert first.user_attrs["preset"] == "reference" and first.user_attrs["interrupted"]
    assert rerun.user_attrs["preset"] == "reference" and rerun.user_attrs["retry_of"] == 0
    assert rerun.user_attrs["resumed_from_epoch"] == 2 and rerun.state == TrialState.COMPLETE
    assert "re-queued to resume" in out.getvalue()


def test_a_trial_left_running_is_explained(tmp_path: Path, teacher_cache: Path) -> None:
    import io

    from ackd_search.backends.local import run_search

    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache,
                                                                 presets=False, n_trials=1)))
    study = open_study(space, make_storage(space), log=lambda _: None)
    study.ask()  # as a SIGKILLed process leaves its trial: RUNNING
    out = io.StringIO()
    run_search(space, confirm=False, stream=out)
    assert "trials RUNNING: #0" in out.getvalue() and "grace_period_s" in out.getvalue()


def test_a_dead_worker_is_named_and_its_share_runs_in_the_parent(tmp_path: Path, teacher_cache: Path,
                                                                 monkeypatch, capsys) -> None:
    import argparse

    import ackd_search.backends.workers as workers_module

    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=4)
    space = load_space(write(tmp_path / "space.yaml", data))
    real_command = workers_module.worker_command

    def second_worker_dies(args, index, n_trials):
        if index == 1:
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        return real_command(args, index, n_trials)

    monkeypatch.setattr(workers_module, "worker_command", second_worker_dies)
    args = argparse.Namespace(space=str(tmp_path / "space.yaml"), storage=None, n_trials=4, timeout=None, workers=2,
                              seed_offset=0, no_confirm=True)
    assert workers_module.run_workers(args, space) == 0
    out = capsys.readouterr().out
    assert "worker w2 (pid" in out and "exited with code 3 after 0 of 2 trials" in out
    assert "running its 2 remaining trials here" in out
    trials = optuna.load_study(study_name="tiny", storage=data["study"]["storage"]).trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)


def test_a_trial_whose_process_stopped_beating_is_failed_with_a_reason_and_retried(tmp_path: Path) -> None:
    import time

    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, presets=False)))  # grace 3 s
    study = open_study(space, make_storage(space), log=lambda _: None)
    trial = study.ask()
    trial.suggest_float("optim.lr", 1e-4, 0.1, log=True)
    study._storage.record_heartbeat(trial._trial_id)  # then the process is killed
    time.sleep(space.study.grace_period_s + 1)
    optuna.storages.fail_stale_trials(study)
    trials = optuna.load_study(study_name="tiny", storage=space.storage_url).trials
    assert trials[0].state == TrialState.FAIL
    assert "stopped beating" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert "fail_reason" not in trials[1].user_attrs


def test_an_interrupted_heartbeat_retry_resumes_in_its_originals_folder(tmp_path: Path, teacher_cache: Path,
                                                                        monkeypatch) -> None:
    import time

    from ackd_search.backends.local import run_search

    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=1)
    space = load_space(write(tmp_path / "space.yaml", data))
    study = open_study(space, make_storage(space), log=lambda _: None)
    killed = study.ask()
    space.suggest(killed)  # a worker drew the parameters, then was SIGKILLed before its first epoch
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(space.study.grace_period_s + 1)
    with interrupted_at_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run_search(space, confirm=False)  # the stale trial is retried as trial 1, in trial-00000, and interrupted
    study = run_search(space, confirm=False)
    killed, retry, rerun = study.trials[:3]
    assert killed.state == TrialState.FAIL and retry.user_attrs["interrupted"]
    assert rerun.user_attrs["retry_of"] == 0 and rerun.user_attrs["resumed_from_epoch"] == 2
    assert rerun.state == TrialState.COMPLETE and rerun.params == killed.params
    assert not (Path(space.study.runs_dir) / "trial-00001").exists()  # every attempt used the original's folder
