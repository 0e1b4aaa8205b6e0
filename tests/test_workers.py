"""Several worker processes on one study: SQLite (local), PostgreSQL and MySQL/MariaDB (many machines).

The server databases are the local test services; a test skips with the reason when its database does not answer,
unless ACKD_REQUIRE_DATABASES=1 (as `.ci/run` sets), where an absent database fails the test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tiny_space import tiny_space, write

from ackd_search.backends.workers import shares
from ackd_search.errors import StudyError
from ackd_search.searching.storage import check_storage

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def reachable_or_skip(url: str) -> None:
    try:
        check_storage(url)  # the search's own reachability check: connects, writes nothing
    except StudyError as err:
        reason = f"{err} (a local test database)"
        if os.environ.get("ACKD_REQUIRE_DATABASES") == "1":
            pytest.fail(reason + "; required here: ACKD_REQUIRE_DATABASES=1")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def test_shares_split_trials_exactly() -> None:
    assert shares(7, 3) == [3, 2, 2] and sum(shares(5, 4)) == 5 and shares(None, 2) == [None, None]


def run_workers(space_file: Path, workers: int, n_trials: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "search.py"), "--space", str(space_file), "--workers", str(workers),
         "--n-trials", str(n_trials), "--no-confirm"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=False,
    )


def check_shared_study(storage: str, name: str, expected: int, out: str) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials
    assert len(trials) == expected, out
    assert sorted(t.number for t in trials) == list(range(expected))  # none lost, none duplicated
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials), out
    assert [t.user_attrs.get("preset") for t in trials].count("reference") == 1
    assert [t.user_attrs.get("preset") for t in trials].count("kd") == 1
    assert "[w1]" in out and "[w2]" in out  # both workers ran trials
    assert out.count(f"study {name}: ") == 1, out  # one summary, by the parent


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"])
def test_two_workers_share_one_study(tmp_path: Path, teacher_cache: Path, backend: str) -> None:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    storage = None if backend == "sqlite" else SERVERS[backend]
    if storage:
        reachable_or_skip(storage)
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=storage, n_trials=6)
    space_file = write(tmp_path / "space.yaml", data)
    try:
        cli = run_workers(space_file, workers=2, n_trials=6)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        check_shared_study(data["study"]["storage"], name, 6, cli.stdout)
        # A second round on the same study adds to it, still without gaps or repeats.
        cli = run_workers(space_file, workers=2, n_trials=2)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        check_shared_study(data["study"]["storage"], name, 8, cli.stdout)
    finally:
        if storage:
            optuna.delete_study(study_name=name, storage=storage)


def test_workers_auto_packs_per_gpu_and_is_a_worker_per_core_without_cuda(monkeypatch) -> None:
    from ackd_search.backends.workers import worker_slots
    from ackd_search.cli import parse_args

    assert parse_args(["search", "--space", "x.yaml", "--workers", "auto"]).workers == "auto"
    with pytest.raises(SystemExit):
        parse_args(["search", "--space", "x.yaml", "--workers", "0"])
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, even on a GPU machine
    slots = worker_slots("auto")
    assert len(slots) == 16 and all(s.cuda_device is None and s.threads == 1 for s in slots)
    three = worker_slots(3)
    assert [s.threads for s in three] == [5, 5, 5] and all(s.env()["OMP_NUM_THREADS"] == "5" for s in three)


def test_a_finished_study_confirms_from_the_command_line(tmp_path: Path, teacher_cache: Path) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=2,
                      confirm={"top_k": 1, "seeds": 2, "epochs": 1, "presets": ["kd"]})
    space_file = write(tmp_path / "space.yaml", data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    search = [sys.executable, str(ROOT / "search.py")]
    first = subprocess.run([*search, "--space", str(space_file), "--no-confirm"], capture_output=True, text=True,
                           timeout=600, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "confirmation over seeds" not in first.stdout
    confirm = subprocess.run([*search, "confirm", "--space", str(space_file)], capture_output=True, text=True,
                             timeout=600, cwd=ROOT, env=env)
    assert confirm.returncode == 0, confirm.stdout + confirm.stderr
    assert "confirmation over seeds [1, 2]" in confirm.stdout and "winner:" in confirm.stdout
    study = optuna.load_study(study_name="tiny", storage=data["study"]["storage"])
    assert not any("confirms" in t.user_attrs for t in study.trials)  # the search study holds search trials only
    confirmation = optuna.load_study(study_name="tiny-confirm", storage=data["study"]["storage"])
    runs = [t for t in confirmation.trials if "confirms" in t.user_attrs]
    assert len(runs) == 4 and all(t.state == TrialState.COMPLETE for t in runs)  # (kd, best) x 2 seeds
    again = subprocess.run([*search, "confirm", "--space", str(space_file)], capture_output=True, text=True,
                           timeout=600, cwd=ROOT, env=env)
    assert again.returncode == 0 and "0 runs queued" in again.stdout
    for name, trials in (("tiny", study.trials), ("tiny-confirm", confirmation.trials)):
        assert len(optuna.load_study(study_name=name, storage=data["study"]["storage"]).trials) == len(trials)
