"""Fault tolerance with real processes: a worker SIGKILLed mid-trial is failed by heartbeat and its trial re-run
from the last epoch checkpoint; SIGINT/SIGTERM record the running trial honestly; NaN and out-of-memory trials
fail alone; broken input of every kind is one line, a non-zero exit and an untouched study database."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from tiny_space import tiny_space, write

import ackd_search.searching.objective as objective_module
import ackd_search.training.loop as trainer_module
from ackd_search.backends.local import run_search
from ackd_search.cli import main as cli_main
from ackd_search.distill import KD
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import open_study, quiet_optuna

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

quiet_optuna()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def slow_space(tmp_path: Path, teacher_cache: Path, **study) -> Path:
    """Trials long enough (full digits, 12 epochs) to be caught mid-run."""
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, pruner={"name": "none"}, **study)
    data["run"]["data"].pop("limit")
    data["run"]["optim"]["epochs"] = 12
    return write(tmp_path / "space.yaml", data)


def start_search(space_file: Path, *extra: str) -> subprocess.Popen:
    # Without the confirmation stage: these tests count the search's own trials.
    return subprocess.Popen([sys.executable, str(ROOT / "search.py"), "--space", str(space_file), "--no-confirm",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def load(space_file: Path) -> optuna.Study:
    space = load_space(space_file)
    return optuna.load_study(study_name=space.study.name, storage=space.storage_url)


def wait_for_running_epochs(space_file: Path, proc: subprocess.Popen, epochs: int, timeout: float = 240):
    """Wait until a trial is RUNNING with at least `epochs` epochs reported (and so checkpointed)."""
    deadline = time.monotonic() + timeout
    # Touch the database only once the search has created the study: a reader opening it earlier would race the
    # search in creating Optuna's tables.
    seen = []
    while not any("trials finished so far" in line for line in seen):
        line = proc.stdout.readline()
        assert line, "".join(seen)  # the search ended before opening its study
        seen.append(line)
    while time.monotonic() < deadline:
        assert proc.poll() is None, "".join(seen) + proc.stdout.read()
        running = [t for t in load(space_file).trials if t.state == TrialState.RUNNING]
        if running and len(running[0].intermediate_values) >= epochs:
            return running[0]
        time.sleep(0.2)
    raise AssertionError("no trial reached the wanted epoch in time")


def test_sigkilled_worker_trial_is_failed_and_resumed_from_checkpoint(tmp_path: Path, teacher_cache: Path) -> None:
    space_file = slow_space(tmp_path, teacher_cache, n_trials=1)
    proc = start_search(space_file)
    victim = wait_for_running_epochs(space_file, proc, epochs=2)
    proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING
    proc.wait()
    assert load(space_file).trials[victim.number].state == TrialState.RUNNING
    time.sleep(4)  # past the 3 s grace period: its heartbeat is stale
    # The re-run joins the queue behind the KD preset, and comes free: one trial asked for, both run.
    after = start_search(space_file, "--n-trials", "1")
    out, _ = after.communicate(timeout=300)
    assert after.returncode == 0, out
    trials = load(space_file).trials
    assert len(trials) == 3 and all(t.state in FINISHED for t in trials)
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.number != victim.number and t.system_attrs.get("failed_trial") is not None]
    assert retry.user_attrs["retry_of"] == victim.number and "re-run" in out and "resumes #0" in out
    assert retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    assert retry.system_attrs.get("failed_trial") == victim.number
    # It continued from the victim's checkpoint rather than starting over, and its curve is whole.
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert sorted(retry.intermediate_values) == list(range(1, 13))
    for epoch, value in victim.intermediate_values.items():
        assert retry.intermediate_values[epoch] == value


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_records_the_running_trial_and_the_next_run_resumes_it(tmp_path: Path, teacher_cache: Path,
                                                                      signum: int) -> None:
    space_file = slow_space(tmp_path, teacher_cache, n_trials=3)
    proc = start_search(space_file)
    victim = wait_for_running_epochs(space_file, proc, epochs=1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    trials = load(space_file).trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number <= victim.number]
    stopped = trials[victim.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    again = start_search(space_file, "--n-trials", "1")  # the KD preset waiting, then the re-queued trial (free)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "re-queued" in out
    trials = load(space_file).trials
    resumed = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(resumed) == 1 and resumed[0].state == TrialState.COMPLETE
    assert resumed[0].params == victim.params and resumed[0].user_attrs["resumed_from_epoch"] >= 1
    assert all(t.state in FINISHED for t in trials)


def test_non_finite_loss_stops_that_trial_only(tmp_path: Path, teacher_cache: Path, monkeypatch) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=2)
    data["run"]["distill"]["method"] = "kd"
    space = load_space(write(tmp_path / "s.yaml", data))
    study = open_study(space, make_storage(space))
    blowup_lr = 0.0123  # the trial whose loss turns NaN in its second epoch, as a diverging run's would
    study.enqueue_trial({"optim.lr": blowup_lr, "distill.temperature": 4.0})
    study.enqueue_trial({"optim.lr": 0.05, "distill.temperature": 4.0})
    real_step = KD.forward_train

    def diverging(self, x, y, epoch, teacher_out=None):
        logits, loss, terms = real_step(self, x, y, epoch, teacher_out=teacher_out)
        if epoch >= 1 and self.training and self.student_lr == blowup_lr:
            loss = loss * float("nan")
        return logits, loss, terms

    real_init = trainer_module.Run.__init__

    def remember_lr(self, cfg, reporter, **handed_in):
        real_init(self, cfg, reporter, **handed_in)
        self.distiller.student_lr = cfg.optim.lr

    monkeypatch.setattr(KD, "forward_train", diverging)
    monkeypatch.setattr(trainer_module.Run, "__init__", remember_lr)
    study = run_search(space, confirm=False)
    blown, fine = study.trials
    assert blown.state == TrialState.PRUNED
    assert "non-finite at epoch 2" in blown.user_attrs["fail_reason"]
    assert sorted(blown.intermediate_values) == [1]  # stopped inside epoch 2, nothing after it was trained
    assert fine.state == TrialState.COMPLETE
    run_dir = Path(space.study.runs_dir) / f"trial-{blown.number:05d}"
    assert not (run_dir / "checkpoint.pt").exists()  # nothing to resume: the curve and its cost are kept instead
    metas = optuna.artifacts.get_all_artifact_meta(blown, storage=study._storage)
    assert "curve.json" in {m.filename for m in metas}
    assert blown.user_attrs["student_params"] > 0 and blown.user_attrs["epochs_run"] == 1


def test_out_of_memory_fails_that_trial_only(tmp_path: Path, teacher_cache: Path, monkeypatch) -> None:
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=3)))
    real_train, calls = objective_module.run_training, []

    def flaky_train(cfg, reporter=None, **identity):
        calls.append(cfg)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_train(cfg, reporter, **identity)

    monkeypatch.setattr(objective_module, "run_training", flaky_train)
    study = run_search(space, confirm=False)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and states[1:] == [TrialState.COMPLETE] * 2
    assert study.trials[0].user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory")
    error_log = Path(space.study.runs_dir) / "trial-00000" / "error.log"
    assert "OutOfMemoryError" in error_log.read_text()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _broken(tmp_path: Path, teacher_cache: Path) -> dict[str, dict | str]:
    """Each broken input, as a space file's text or data, aimed at the same existing study database."""
    good = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=1)

    def change(fn) -> dict:
        data = tiny_space(tmp_path, teacher_cache=teacher_cache, n_trials=1)
        fn(data)
        return data

    garbage = tmp_path / "teacher.pt"
    garbage.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    return {
        "malformed YAML": "study: {name: tiny\nrun: [",
        "wrong type": change(lambda d: d["run"]["optim"].update(epochs="many")),
        "unknown key": change(lambda d: d["run"]["distill"].update(temprature=4)),
        "inverted range": change(lambda d: d["run"]["optim"].update(lr={"low": 0.1, "high": 0.01})),
        "unreachable storage": change(lambda d: d["study"].update(storage="postgresql://x@127.0.0.1:9/none")),
        "malformed storage URL": change(lambda d: d["study"].update(storage="sqlite//nowhere")),
        "same name, other space": change(lambda d: d["run"]["optim"].update(batch_size=32)),
        "corrupted teacher checkpoint": change(lambda d: d["run"]["teacher"].update(checkpoint=str(garbage))),
        "missing data folder": change(lambda d: d["run"].update(
            data={"name": "cifar100", "data_root": str(tmp_path / "no-data"), "download": False})),
        "unknown architecture": change(lambda d: d["run"].update(student="resnet9000")),
        "good": good,
    }


def test_bad_input_is_one_line_nonzero_and_leaves_the_study_untouched(tmp_path: Path, teacher_cache: Path,
                                                                      capsys) -> None:
    cases = _broken(tmp_path, teacher_cache)
    good = write(tmp_path / "good.yaml", cases.pop("good"))
    run_search(load_space(good), confirm=False)
    db = tmp_path / "tiny.db"
    before = _sha(db)
    for index, (label, content) in enumerate(cases.items()):
        path = tmp_path / "broken.yaml"
        if isinstance(content, str):
            path.write_text(content)
        else:
            write(path, content)
        if index == 0:  # the first as a real process (exit code, stderr); the rest in-process: the same main()
            cli = subprocess.run([sys.executable, str(ROOT / "search.py"), "--space", str(path)], capture_output=True,
                                 text=True, timeout=120, cwd=ROOT, check=False)
            code, stderr = cli.returncode, cli.stderr
        else:
            capsys.readouterr()
            code = cli_main(["--space", str(path)])
            stderr = capsys.readouterr().err
        assert code == 2, (label, stderr)
        assert "Traceback" not in stderr, (label, stderr)
        lines = stderr.strip().splitlines()
        assert lines and lines[0].startswith("error: "), (label, stderr)
        if label not in ("wrong type", "unknown key", "inverted range", "unknown architecture"):
            assert len(lines) == 1, (label, stderr)  # validation may list several problems, one per line
        assert _sha(db) == before, label
    assert os.path.exists(db)


# --- the table of faults tried (tests/FAULTS.md) stays in step with the tests ---------------------------------


def test_faults_table_cites_only_tests_that_exist() -> None:
    tests = Path(__file__).parent
    defined = {path.name: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
               for path in tests.glob("test_*.py")}
    everywhere = set().union(*defined.values())
    text = (tests / "FAULTS.md").read_text()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| id ")]
    assert rows and all(len(row) == 4 for row in rows), [row for row in rows if len(row) != 4]
    pinned = 0
    for fault_id, _, _, pinned_by in rows:
        if pinned_by == "open":
            continue
        cited = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", pinned_by)
        assert cited, f"{fault_id}: 'pinned by' names no test: {pinned_by!r}"
        for file, name in cited:
            assert name in (defined.get(file, set()) if file else everywhere), f"{fault_id}: no test {name}"
        pinned += 1
    tried, said_pinned, said_open = map(int, re.search(r"(\d+) tried, (\d+) pinned by a test, (\d+) open",
                                                        text).groups())
    assert (tried, said_pinned, said_open) == (len(rows), pinned, len(rows) - pinned)
