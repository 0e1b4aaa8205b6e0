"""Faults a cluster meets (issue #20), each run as the fault probe ran it: a database restart mid-trial (a TCP proxy
the test takes down), a full disk (a small tmpfs, or a write that fails with ENOSPC), a worker frozen past the grace
period while another re-runs its trial, a Ray node lost mid-trial (a second local raylet killed), passwords on
command lines and in the study, Tune's error pickle, the artifact folder deleted mid-run, and the progress count.
Each ends with every trial in a true final state (or resumed), nothing lost, at most a line per fault."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import ray
import sqlalchemy
import torch
from db_proxy import DatabaseProxy
from optuna.trial import TrialState
from test_workers import SERVERS, reachable_or_skip
from tiny_space import tiny_space, write

import ackd_search.files as files_module
import ackd_search.searching.objective as objective_module
from ackd_search.backends.local import run_search
from ackd_search.searching.artifact_store import artifact_metas
from ackd_search.searching.artifacts import stored_config
from ackd_search.searching.record import StudyPaths
from ackd_search.searching.resilient import ResilientStorage, StorageOutage, is_transient
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study, quiet_optuna
from ackd_search.training import CHECKPOINT, CheckpointError, load_checkpoint
from ackd_search.training.checkpoints import NotOwner, claim_run_dir, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
PASSWORD = "s3cr3t-pw-20"  # PostgreSQL here trusts local connections: any password is accepted, and must not leak
quiet_optuna()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture()
def postgres():
    """The test PostgreSQL server's URL (required where ACKD_REQUIRE_DATABASES=1) and the studies to drop after."""
    url = SERVERS["postgresql"]
    reachable_or_skip(url)
    names: list[str] = []
    yield url, names
    for name in names:
        for study in (name, name + "-confirm"):
            try:
                optuna.delete_study(study_name=study, storage=url)
            except KeyError:
                pass


@pytest.fixture()
def proxy():
    server = DatabaseProxy(5432)
    yield server
    server.close()


def unique(prefix: str = "faults") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stored(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).trials


def at_epoch(monkeypatch, epoch: int, action, when=lambda reporter: True) -> list[int]:
    """Run `action(reporter)` once, after the first trial `when` accepts has reported `epoch`."""
    real, fired = objective_module.OptunaReporter.__call__, []

    def hooked(self, reached, metrics):
        real(self, reached, metrics)
        if reached == epoch and not fired and when(self):
            fired.append(self.trial.number)
            action(self)

    monkeypatch.setattr(objective_module.OptunaReporter, "__call__", hooked)
    return fired


def one_line_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "unreachable" in line]


# --- 20.1 a database restart mid-trial ------------------------------------------------------------------------


def test_a_database_outage_mid_trial_is_waited_out_and_the_finished_trial_told(
        tmp_path: Path, teacher_cache: Path, postgres, proxy, monkeypatch, capfd) -> None:
    url, names = postgres
    name = unique()
    names.append(name)
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=proxy.url(url), presets=False,
                      n_trials=2, pruner={"name": "none"})
    space = load_space(write(tmp_path / "space.yaml", data))
    # The last epoch is reported, then the server goes away for 3 s: attributes, artifacts' metadata and tell all
    # fall in the outage, and the heartbeat thread beats into it.
    fired = at_epoch(monkeypatch, 4, lambda reporter: proxy.outage(3))
    run_search(space, confirm=False)
    assert fired == [0]
    trials = stored(name, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert sorted(trials[0].intermediate_values) == [1, 2, 3, 4] and trials[0].user_attrs["wall_time_s"] > 0
    assert "curve.json" in {m["filename"] for m in artifact_metas(trials[0])}
    captured = capfd.readouterr()
    assert len(one_line_errors(captured.err)) == 1, captured.err  # one line for the outage
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / f"{name}-runs" / "trial-00000" / "checkpoint.pt").exists()  # told, then removed


def test_an_outage_past_storage_outage_s_stops_in_one_line_and_the_next_run_resumes_the_finished_trial(
        tmp_path: Path, teacher_cache: Path, postgres, proxy, monkeypatch, capfd) -> None:
    url, names = postgres
    name = unique()
    names.append(name)
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=proxy.url(url), presets=False,
                      n_trials=2, pruner={"name": "none"}, storage_outage_s=2)
    space = load_space(write(tmp_path / "space.yaml", data))
    assert space.study.storage_outage_s == 2
    at_epoch(monkeypatch, 4, lambda reporter: proxy.down())  # trained to the end, then the server is gone
    with pytest.raises(StorageOutage) as stopped:
        run_search(space, confirm=False)
    assert "\n" not in str(stopped.value) and "resume from their last checkpoints" in str(stopped.value)
    monkeypatch.undo()
    proxy.up()
    run_dir = tmp_path / f"{name}-runs" / "trial-00000"
    assert load_checkpoint(run_dir / "checkpoint.pt")["epochs_done"] == 4  # the finished training is kept
    assert stored(name, url)[0].state == TrialState.RUNNING  # the storage could not be told
    time.sleep(space.study.grace_period_s + 1)
    run_search(load_space(space.source), n_trials=1, confirm=False)
    killed, rerun, new = stored(name, url)
    assert killed.state == TrialState.FAIL and "stopped beating" in killed.user_attrs["fail_reason"]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["retry_of"] == 0
    assert rerun.user_attrs["resumed_from_epoch"] == 4 and sorted(rerun.intermediate_values) == [1, 2, 3, 4]
    assert new.state == TrialState.COMPLETE and "retry_of" not in new.user_attrs  # the re-run came free
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert len(one_line_errors(captured.err)) == 1, captured.err


def _search_cmd(space_file: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), "--space", str(space_file), "--no-confirm", *extra]


def test_workers_wait_out_a_database_restart(tmp_path: Path, teacher_cache: Path, postgres, proxy) -> None:
    url, names = postgres
    name = unique()
    names.append(name)
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=proxy.url(url), n_trials=2)
    data["run"]["optim"]["epochs"] = 6
    space_file = write(tmp_path / "space.yaml", data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(_search_cmd(space_file, "--workers", "2", "--n-trials", "2"), stdout=out,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            running = [t for t in _trials_or_none(name, url) if t.state == TrialState.RUNNING]
            if running and running[0].intermediate_values:
                proxy.outage(4)  # both workers mid-trial or between trials: every call waits it out
                break
            time.sleep(0.3)
        proc.wait(timeout=600)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text
    trials = stored(name, url)
    assert len(trials) == 2 and all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert "Traceback" not in text and "exited with code" not in text, text
    assert 1 <= len(one_line_errors(text)) <= 2, text  # one line per worker that met the outage


def _trials_or_none(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return stored(name, url)
    except KeyError:
        return []  # not created yet


def test_a_storage_call_waits_for_the_server_then_gives_up_past_the_limit(postgres, proxy) -> None:
    url, _ = postgres
    said: list[str] = []
    storage = ResilientStorage(proxy.url(url), engine_kwargs={"pool_pre_ping": True}, outage_s=30, say=said.append)
    storage.get_all_studies()
    proxy.outage(2)
    started = time.monotonic()
    storage.get_all_studies()  # waits for the server
    assert 1.5 < time.monotonic() - started < 20 and len(said) == 1
    storage.outage.limit_s = 1
    proxy.down()
    storage.record_heartbeat(-1)  # a heartbeat into an outage: no exception (no thread traceback)
    with pytest.raises(StorageOutage, match="unreachable or unwritable for"):
        storage.get_all_studies()
    assert len(said) == 2  # one line per outage
    proxy.up()
    storage.get_all_studies()  # back: the outage ended
    assert storage.outage.since is None
    dropped = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = dropped  # as Optuna raises it
    assert is_transient(wrapped) and is_transient(dropped)
    assert not is_transient(sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("relation x does not exist")))
    assert not is_transient(sqlalchemy.exc.OperationalError("SELECT", {}, Exception("no such table: trials")))


# --- 20.2 a full disk --------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 24 MB tmpfs (root only; skipped elsewhere, where the ENOSPC test below stands in)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    try:
        while True:  # the last partial block
            with open(filler, "ab") as out:
                out.write(b"\0" * 4096)
    except OSError:
        pass
    return filler


def test_a_full_disk_stops_the_search_in_one_line_and_the_next_run_resumes_the_trial(
        tmp_path: Path, teacher_cache: Path, small_disk: Path, monkeypatch, capfd) -> None:
    data = tiny_space(small_disk, teacher_cache=teacher_cache, presets=False, n_trials=2, pruner={"name": "none"},
                      storage_outage_s=3)
    space = load_space(write(tmp_path / "space.yaml", data))
    fillers = []
    at_epoch(monkeypatch, 2, lambda reporter: fillers.append(fill(small_disk)))  # database, runs, artifacts: full
    with pytest.raises(StorageOutage) as stopped:
        run_search(space, confirm=False)
    assert "\n" not in str(stopped.value)
    monkeypatch.undo()
    fillers[0].unlink()
    run_dir = small_disk / "tiny-runs" / "trial-00000"
    assert load_checkpoint(run_dir / "checkpoint.pt")["epochs_done"] == 2  # the last whole checkpoint
    assert not list(run_dir.glob("*.tmp*"))  # no half file left
    time.sleep(space.study.grace_period_s + 1)
    study = run_search(load_space(space.source), n_trials=1, confirm=False)
    trials = study.trials
    assert all(t.state in FINISHED for t in trials) and trials[0].state == TrialState.FAIL
    rerun = trials[1]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["resumed_from_epoch"] == 2
    assert sorted(rerun.intermediate_values) == [1, 2, 3, 4]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Should not reach" not in captured.err
    assert len(one_line_errors(captured.err)) == 1, captured.err


def test_a_trial_that_cannot_write_fails_alone_with_its_reason_and_the_previous_checkpoint_whole(
        tmp_path: Path, teacher_cache: Path, monkeypatch, capsys) -> None:
    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache,
                                                                 presets=False, n_trials=2, pruner={"name": "none"})))
    real_save, failed = torch.save, []

    def disk_fills(obj, path, *args, **kwargs):  # the second epoch's checkpoint of trial 0 meets a full disk
        if str(path).endswith(f".tmp{os.getpid()}") and "trial-00000" in str(path) and obj.get("epochs_done") == 2:
            Path(path).write_bytes(b"half a checkpoint")
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(files_module.torch, "save", disk_fills)
    study = run_search(space, confirm=False)
    monkeypatch.undo()
    first, second = study.trials
    assert failed and first.state == TrialState.FAIL and second.state == TrialState.COMPLETE
    assert first.user_attrs["fail_reason"] == "OSError: [Errno 28] No space left on device"
    run_dir = tmp_path / "tiny-runs" / "trial-00000"
    assert load_checkpoint(run_dir / "checkpoint.pt")["epochs_done"] == 1  # the previous one, whole
    assert not list(run_dir.glob("*.tmp*")) and "No space left" in (run_dir / "error.log").read_text()
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert len([line for line in out.out.splitlines() if "No space left" in line]) == 1  # its one line


def test_a_plot_that_meets_a_full_disk_leaves_the_previous_one_whole(tmp_path: Path, monkeypatch) -> None:
    # The probe's `loss_terms.png` of 0 bytes: the plot is drawn into a temporary file and renamed into place.
    from matplotlib.figure import Figure

    from ackd_search.view.plots import plot_history

    history = [{"epoch": e, "val_acc": 50.0 + e, "terms": {"ce": 1.0 / e}} for e in (1, 2, 3)]
    plot = plot_history(history, tmp_path / "loss_terms.png", "trial #0")
    before = plot.read_bytes()
    assert before.startswith(b"\x89PNG")

    def disk_fills(self, out, *args, **kwargs):
        out.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        plot_history(history[:2], plot, "trial #0")
    assert plot.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["loss_terms.png"]


# --- 20.3 a frozen worker that lost its trial ----------------------------------------------------------------------


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_frozen_worker_that_lost_its_trial_stops_without_touching_the_retry(tmp_path: Path, teacher_cache: Path,
                                                                             postgres) -> None:
    # On PostgreSQL, as the probe ran it: on SQLite a process frozen inside a transaction holds the file's lock,
    # and every other process waits for it to thaw (SQLite has one writer).
    url, names = postgres
    name = unique("frozen")
    names.append(name)
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=url, presets=False, n_trials=1,
                      pruner={"name": "none"})
    data["run"]["optim"]["epochs"] = 16  # long enough to be frozen, re-run and thawed mid-trial
    space_file = write(tmp_path / "space.yaml", data)
    run_dir = tmp_path / f"{name}-runs" / "trial-00000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with open(logs[0], "w") as out:
        a = subprocess.Popen(_search_cmd(space_file, "--n-trials", "1"), stdout=out, stderr=subprocess.STDOUT,
                             cwd=ROOT, env=env)
    b = None
    try:
        _wait_for(lambda: "trials finished so far" in logs[0].read_text(), 240, "the first worker's study")
        victim = _wait_for(lambda: next((t for t in stored(name, url) if t.state == TrialState.RUNNING
                                         and len(t.intermediate_values) >= 2), None), 240, "trial #0 at epoch 2")
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(4.5)  # past the 3 s grace period: its heartbeat is stale
        with open(logs[1], "w") as out:
            b = subprocess.Popen(_search_cmd(space_file, "--n-trials", "1"), stdout=out, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=env)
        _wait_for(lambda: json.loads((run_dir / "owner.json").read_text()).get("trial") != 0, 240,
                  "the re-run to take over the run folder")
        # Read while frozen (a commit in flight at SIGSTOP has landed by now): nothing more may come after the thaw.
        epochs_when_frozen = len(stored(name, url)[victim.number].intermediate_values)
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=120) == 0, logs[0].read_text()
        assert b.wait(timeout=300) == 0, logs[1].read_text()
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    first = logs[0].read_text()
    assert "Traceback" not in first and "Cannot tell" not in first, first
    (lost_line,) = [line for line in first.splitlines() if re.search(r"#0\s+FAIL", line)]  # one line, then it stops
    assert "stopped beating" in lost_line
    trials = stored(name, url)
    frozen, rerun = trials[0], trials[1]
    assert frozen.state == TrialState.FAIL and len(frozen.intermediate_values) == epochs_when_frozen
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["retry_of"] == 0
    assert sorted(rerun.intermediate_values) == list(range(1, 17)) and rerun.user_attrs["resumed_from_epoch"] >= 2
    assert all(t.state in FINISHED for t in trials)
    assert json.loads((run_dir / "owner.json").read_text())["trial"] == rerun.number
    assert not (run_dir / "error.log").exists() and not (run_dir / "checkpoint.pt").exists()


def test_a_write_by_an_attempt_that_lost_its_run_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from ackd_search.config import RunConfig

    run_dir = tmp_path / "trial-00000"
    claim_run_dir(run_dir, {"token": "first", "trial": 0, "pid": 1, "host": "a"})
    identity = {"study": "s", "study_uid": "u", "trial": 0}
    write_checkpoint(run_dir / "checkpoint.pt", {"epochs_done": 1}, {**identity, "owner": "first"}, RunConfig())
    before = hashlib.sha256((run_dir / "checkpoint.pt").read_bytes()).hexdigest()
    claim_run_dir(run_dir, {"token": "second", "trial": 3, "pid": 2, "host": "b"})
    with pytest.raises(NotOwner, match=r"taken over by trial #3 \(pid 2 on b\)"):
        write_checkpoint(run_dir / "checkpoint.pt", {"epochs_done": 2}, {**identity, "owner": "first"}, RunConfig())
    assert hashlib.sha256((run_dir / "checkpoint.pt").read_bytes()).hexdigest() == before
    # The re-run resumes the same checkpoint: the owner token is not part of what it must match.
    write_checkpoint(run_dir / "checkpoint.pt", {"epochs_done": 2}, {**identity, "owner": "second"}, RunConfig())
    assert load_checkpoint(run_dir / "checkpoint.pt")["identity"] == identity


# --- 20.5 no password on a command line, in the study or its files --------------------------------------------


def _command_lines() -> list[str]:
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return lines


def _study_text(name: str, url: str) -> str:
    """Every attribute, note and parameter the database holds for the study, as text."""
    engine = sqlalchemy.create_engine(url)
    parts = []
    with engine.connect() as conn:
        ids = [r[0] for r in conn.exec_driver_sql("SELECT study_id FROM studies WHERE study_name LIKE %(n)s",
                                                  {"n": name + "%"})]
        for table in ("study_user_attributes", "study_system_attributes"):
            parts += [str(r) for r in conn.exec_driver_sql(f"SELECT * FROM {table} WHERE study_id = ANY(%(i)s)",
                                                           {"i": ids})]
        for table in ("trial_user_attributes", "trial_system_attributes", "trial_params"):
            parts += [str(r) for r in conn.exec_driver_sql(
                f"SELECT t.* FROM {table} t JOIN trials USING (trial_id) WHERE study_id = ANY(%(i)s)", {"i": ids})]
    engine.dispose()
    assert parts
    return "\n".join(parts)


def _files_holding(root: Path, secret: str, skip: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p != skip and secret.encode() in p.read_bytes()]


def test_no_password_reaches_a_command_line_the_study_or_its_files(tmp_path: Path, teacher_cache: Path,
                                                                   postgres) -> None:
    url, names = postgres
    name = unique("secret")
    names.append(name)
    secret_url = url.replace("postgres@", f"postgres:{PASSWORD}@")
    # The password both in the space file and on the parent's own command line (the user's choice): neither
    # reaches a worker's command line, the database or a file the search writes.
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=secret_url, n_trials=2)
    data["run"]["optim"]["epochs"] = 3
    space_file = write(tmp_path / "space.yaml", data)
    proc = subprocess.Popen(_search_cmd(space_file, "--workers", "2", "--n-trials", "2", "--storage", secret_url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.append(proc.stdout.read()), daemon=True)
    reader.start()
    workers = _wait_for(lambda: [c for c in _command_lines() if "--worker-tag" in c and str(space_file) in c], 300,
                        "the worker processes")
    assert workers and not [c for c in _command_lines() if PASSWORD in c and "--worker-tag" in c]
    assert proc.wait(timeout=600) == 0
    reader.join(timeout=30)
    assert PASSWORD not in seen[0], seen[0]
    assert len(stored(name, url)) == 2
    assert PASSWORD not in _study_text(name, url)
    assert not _files_holding(tmp_path, PASSWORD, skip=space_file)


def test_the_dashboard_serves_in_this_process(tmp_path: Path, postgres, monkeypatch) -> None:
    import ackd_search.cli as cli

    url, names = postgres
    name = unique("dash")
    names.append(name)
    space_file = write(tmp_path / "space.yaml", tiny_space(tmp_path, name=name,
                                                           storage=url.replace("postgres@", f"postgres:{PASSWORD}@")))
    space = load_space(space_file)
    open_study(space, make_storage(space), log=lambda _: None)
    served, started = [], []
    monkeypatch.setattr(cli, "run_server", lambda storage, **kwargs: served.append((storage, kwargs)))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    assert cli.main(["dashboard", "--space", str(space_file), "--port", "38999"]) == 0
    assert served and not started  # no command line at all: the storage object is handed over in-process
    assert PASSWORD not in json.dumps(served[0][1], default=str)


# --- 20.6 nothing unpickled from the study folder ----------------------------------------------------------------


class _Planted:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["ACKD_PLANTED_MARKER"]),))


def test_tunes_error_pickle_is_never_loaded(tmp_path: Path, monkeypatch) -> None:
    from ackd_search.backends import ray_run

    trial_dir = tmp_path / "trial-00000-abc"
    trial_dir.mkdir()
    marker = tmp_path / "ran"
    monkeypatch.setenv("ACKD_PLANTED_MARKER", str(marker))
    (trial_dir / "error.pkl").write_bytes(pickle.dumps(_Planted()))  # whoever can write the folder plants this
    (trial_dir / "error.txt").write_text("Failure # 1 (occurred at 2026-01-01_00-00-00)\nThe actor abc is "
                                         "unavailable: The actor is temporarily unavailable: RpcError: Socket closed. "
                                         "The task may or may not have been executed on the actor.\n")

    class FakeTrial:
        error_file = str(trial_dir / "error.txt")
        pickled_error_file = str(trial_dir / "error.pkl")

    assert ray_run.read_failure(FakeTrial()) == ("The actor is temporarily unavailable: RpcError: Socket closed.")
    assert not marker.exists()
    assert "cloudpickle" not in Path(ray_run.__file__).read_text()


# --- 20.7 the artifact folder deleted mid-run ---------------------------------------------------------------------


def test_a_deleted_artifact_folder_is_recreated_with_a_warning_and_the_artifacts_rewritten(
        tmp_path: Path, teacher_cache: Path, monkeypatch, capfd) -> None:
    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache,
                                                                 presets=False, n_trials=2)))
    paths = StudyPaths.for_space(space)

    def delete(reporter) -> None:  # the artifact folder, and one file its copy in trial #0's run folder
        shutil.rmtree(paths.artifacts)
        (paths.run_dir(0) / "loss_terms.png").unlink()

    at_epoch(monkeypatch, 2, delete, when=lambda r: r.trial.number == 1)
    study = run_search(space, confirm=False)
    err = capfd.readouterr().err
    (line,) = [line for line in err.splitlines() if "artifact folder" in line]
    assert "was deleted during the search; recreated" in line and "rewritten" in line and "1 lost" in line
    for trial in study.trials:  # trial #0's config and curve, and #1's config uploaded before the deletion: back
        for meta in artifact_metas(trial):
            if (trial.number, meta["filename"]) != (0, "loss_terms.png"):
                assert (paths.artifacts / meta["artifact_id"]).is_file(), (trial.number, meta["filename"])
        assert stored_config(trial, paths)["optim"]["lr"] == trial.params["optim.lr"]
    first, second = stored(space.study.name, space.storage_url)  # as `report` or the dashboard reads it
    assert first.user_attrs["artifacts_lost"].startswith("loss_terms.png: the artifact folder was deleted")
    assert "artifacts_lost" not in second.user_attrs


# --- 20.8 the progress count; re-runs are free -------------------------------------------------------------------


def test_reruns_do_not_count_against_n_trials_and_the_count_is_this_runs(tmp_path: Path, teacher_cache: Path) -> None:
    space = load_space(write(tmp_path / "space.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache,
                                                                 presets=False, n_trials=4)))
    study = open_study(space, make_storage(space), log=lambda _: None)
    killed = study.ask()
    space.suggest(killed)  # a worker drew its parameters, then was killed
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(space.study.grace_period_s + 1)
    out = io.StringIO()
    study = run_search(space, n_trials=2, stream=out, confirm=False)
    trials = study.trials
    assert len(trials) == 4  # the killed trial, its re-run (free), and the two asked for
    assert trials[1].user_attrs["retry_of"] == 0 and all(t.state in FINISHED for t in trials)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("trial ")]
    assert [line.split()[1] for line in lines] == ["re-run", "1/2", "2/2"], lines  # this run's 2, not the space's 4
    assert "[resumes #0]" in lines[0]


# --- 20.4 a Ray node lost mid-trial (a second local raylet), and the Ray driver through a database outage ---------


def _children(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _runs_a_trial(node) -> bool:
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for pid in _children(raylet):
        try:
            if b"ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_ray_dumps_of_a_lost_node_are_dropped_and_the_trials_own_lines_kept() -> None:
    from ackd_search.backends.ray_output import RayDumpFilter

    cyan, reset = "\x1b[36m", "\x1b[0m"
    worker = f"{cyan}(train_trial pid=7290){reset} "
    dump = [  # as the probe's terminal showed them: the raylet's dump, then a SIGTERMed worker's traceback
        f"{cyan}(raylet, ip=10.0.0.2){reset} Raylet is terminated. Termination is unexpected. Last 20 lines of "
        "the Raylet logs:",
        "    [2026-01-01 00:00:00,000 I 1 1] main.cc:1 state-dump ...",
        "",
        worker + "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f9848b3e480>",
        worker + "Traceback (most recent call last):",
        worker + '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
        worker + "    def _remove(item, selfref=ref(self)):",
        worker,
        worker + '  File "ray/_private/worker.py", line 1063, in sigterm_handler',
        worker + "SystemExit: 1",
    ]
    kept = [  # the trial's own lines, and a traceback that is not Ray stopping the worker
        worker + "epoch 3 done",
        "trial    1/2 #0    COMPLETE   90.00    9.0s kd",
        worker + "Exception ignored in: <function Foo.__del__ at 0x1>",
        worker + "Traceback (most recent call last):",
        worker + "ValueError: a real error",
    ]
    out = io.StringIO()
    stream = RayDumpFilter(out)
    for line in dump[:3] + kept[:2] + dump[3:] + kept[2:]:
        stream.write(line + "\n")
    stream.release()
    assert out.getvalue().splitlines() == kept


@pytest.fixture(scope="module")
def ray_cluster():
    """A head without CPUs and two one-CPU worker nodes, each its own raylet: trials run on the workers."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_a_lost_ray_node_is_one_line_and_recorded_on_the_trial(tmp_path: Path, teacher_cache: Path, postgres,
                                                               proxy, ray_cluster, capfd) -> None:
    from ackd_search.backends.ray_run import run_ray_search

    cluster, nodes = ray_cluster
    url, names = postgres
    name = unique("ray")
    names.append(name)
    secret_url = proxy.url(url).replace("postgres@", f"postgres:{PASSWORD}@")
    data = tiny_space(tmp_path, name=name, teacher_cache=teacher_cache, storage=secret_url, presets=False,
                      n_trials=1, pruner={"name": "none"})
    data["run"]["optim"]["epochs"] = 16
    data["run"]["distill"]["method"] = "kd"
    space = load_space(write(tmp_path / "space.yaml", data))
    faults: list[str] = []

    runs = StudyPaths.for_space(space)

    def faults_in_turn() -> None:
        def epochs_of(number: int) -> int:
            # The worker's own checkpoint, not the study: the driver writes the reports it has received, and on
            # a busy machine it can be an epoch behind or a whole trial (the node was then lost between trials).
            try:
                return int(load_checkpoint(runs.run_dir(number) / CHECKPOINT)["epochs_done"])
            except CheckpointError:  # not written yet (or already removed: the trial was told)
                return 0

        _wait_for(lambda: epochs_of(0) >= 2, 300, "trial #0 at epoch 2")
        lost = next(node for node in nodes if _runs_a_trial(node))
        cluster.remove_node(lost, allow_graceful=False)  # the raylet and its workers die mid-trial
        nodes.remove(lost)
        faults.append("node")
        _wait_for(lambda: epochs_of(1) >= 1, 300, "trial #1 at epoch 1")
        proxy.outage(3)  # then the database restarts under the Ray driver
        faults.append("outage")

    killer = threading.Thread(target=faults_in_turn, daemon=True)
    killer.start()
    out = io.StringIO()
    run_ray_search(space, n_trials=2, stream=out, max_concurrent=1, confirm=False)
    captured = capfd.readouterr()  # at once: what reaches the terminal from here on is no longer the search's
    killer.join(timeout=60)
    trials = stored(name, url)
    assert faults == ["node", "outage"], (faults, [(t.number, t.state.name, len(t.intermediate_values),
                                                    t.user_attrs.get("attempts")) for t in trials], out.getvalue())
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    lost = trials[0].user_attrs
    assert lost["attempts"] == 2 and len(lost["lost_attempts"]) == 1 and len(lost["attempt_wall_times_s"]) == 2
    assert lost["lost_attempts"][0]["reason"] and lost["lost_attempts"][0]["wall_time_s"] > 0
    assert lost["wall_time_s"] == pytest.approx(sum(lost["attempt_wall_times_s"]), abs=0.01)
    assert sorted(trials[0].intermediate_values) == list(range(1, 17))
    text = out.getvalue()
    (line,) = [line for line in text.splitlines() if line.startswith("Ray: ")]
    assert "trial #0 lost its" in line and "attempt 2 of at most 3" in line
    assert [line.split()[1] for line in text.splitlines() if line.startswith("trial ")] == ["1/2", "2/2"]
    terminal = captured.out + captured.err
    assert "Raylet is terminated" not in terminal and "state-dump" not in terminal, terminal[-3000:]
    assert "Traceback" not in terminal and "ActorUnavailableError" not in terminal, terminal[-3000:]
    assert len(one_line_errors(terminal)) == 1, terminal[-3000:]
    assert not _files_holding(tmp_path, PASSWORD, skip=tmp_path / "space.yaml")  # tuner.pkl included
    assert PASSWORD not in _study_text(name, url)
    cluster.add_node(num_cpus=1)  # for whatever runs next on this cluster
