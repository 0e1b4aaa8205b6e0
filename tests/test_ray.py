"""The Ray Tune backend on tiny digits runs: trials land in the plain backend's study with their true state (PRUNED
when ASHA or the study's pruner stopped them) and whole curve, the CLI joins a cluster, and Ctrl-C leaves nothing
RUNNING. One Ray instance serves the whole module."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import torch
from optuna.trial import TrialState
from tiny_space import stored_epochs, tiny_space, write

from ackd_search.backends.local import run_search
from ackd_search.backends.ray_run import run_ray_search
from ackd_search.config import ConfigError
from ackd_search.errors import StudyError
from ackd_search.models import count_parameters, create_model
from ackd_search.searching.space import load_space
from ackd_search.searching.storage import make_storage
from ackd_search.searching.study import enqueue_presets, open_study, quiet_optuna
from ackd_search.view.export import export_config, select_trial

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
GOOD = {"optim.lr": 0.05, "distill.temperature": 4.0}
WEAK = {"optim.lr": 0.0001, "distill.temperature": 4.0}  # stays at chance (10%) on digits: any rung stops it

quiet_optuna()


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, teacher_cache, ray_address):
    """Presets, then a deliberately weak trial, then sampled ones; ASHA with a rung at every epoch boundary 1, 2."""
    tmp = tmp_path_factory.mktemp("ray-search")
    space = load_space(write(tmp / "space.yaml", tiny_space(tmp, teacher_cache=teacher_cache, n_trials=5)))
    study = open_study(space, make_storage(space))
    enqueue_presets(study, space)
    study.enqueue_trial({"distill.method": "kd", **WEAK}, user_attrs={"weak": True})
    out = io.StringIO()
    # Two at a time: the weak trial starts after a preset has passed the first rung, so that rung stops it.
    result = run_ray_search(space, stream=out, scheduler="asha", grace_period=1, reduction_factor=2,
                            max_concurrent=2, confirm=False)
    return space, result, out.getvalue()


def stored(space) -> list[optuna.trial.FrozenTrial]:
    """The trials as a fresh reader of the storage URL sees them (another process, the dashboard, export)."""
    return optuna.load_study(study_name=space.study.name, storage=space.storage_url).trials


def test_ray_trials_land_in_the_study_finished(searched) -> None:
    space, _, out = searched
    trials = stored(space)
    assert len(trials) == 5
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert trials[0].user_attrs["preset"] == "reference" and trials[0].params["distill.method"] == "ackd"
    assert trials[0].params["distill.ackd.learners_after_stage_2"] == 3
    assert trials[1].user_attrs["preset"] == "kd" and trials[1].params["distill.method"] == "kd"
    assert trials[2].user_attrs["weak"] and trials[2].params["optim.lr"] == WEAK["optim.lr"]
    assert out.count("\ntrial ") + out.startswith("trial ") == 5  # one progress line per finished trial


def test_a_trial_the_scheduler_stopped_is_pruned_with_its_partial_curve(searched) -> None:
    space, _, _ = searched
    weak = stored(space)[2]
    assert weak.state == TrialState.PRUNED
    stopped = max(weak.intermediate_values)
    assert sorted(weak.intermediate_values) == list(range(1, stopped + 1)) and stopped < 4
    assert weak.value == weak.intermediate_values[stopped]
    assert "history" not in weak.user_attrs and "stopped by the Ray scheduler" in weak.user_attrs["prune_reason"]
    run_dir = Path(space.study.runs_dir) / f"trial-{weak.number:05d}"
    assert [h["epoch"] for h in json.loads((run_dir / "curve.json").read_text())] == list(range(1, stopped + 1))
    assert not (run_dir / "checkpoint.pt").exists()


def test_complete_trials_keep_every_epoch_and_what_users_compare(searched) -> None:
    space, _, _ = searched
    done = [t for t in stored(space) if t.state == TrialState.COMPLETE]
    assert done  # the first trial to reach each rung is never stopped
    params = count_parameters(create_model("digits_cnn_small", 10, in_channels=1))
    runs = Path(space.study.runs_dir)
    for t in done:
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == t.intermediate_values[4]  # the final epoch is stored, not only told
        a = t.user_attrs
        assert a["student_params"] == params and a["student_flops"] > 0 and 0 < a["teacher_val_acc"] <= 100
        assert a["wall_time_s"] > 0 and a["device"].startswith("cpu") and a["seed"] == 0
        run_dir = runs / f"trial-{t.number:05d}"
        history = json.loads((run_dir / "curve.json").read_text())
        assert [h["val_acc"] for h in history] == [t.intermediate_values[e] for e in (1, 2, 3, 4)]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["output_dir"] == str(run_dir)  # absolute, so workers write where the driver reads
        assert Path(config["data"]["data_root"]).is_absolute()
        assert (run_dir / "curve.json").exists() and not (run_dir / "checkpoint.pt").exists()


def test_curves_and_best_weights_are_artifacts(searched) -> None:
    _, study, _ = searched
    metas = optuna.artifacts.get_all_artifact_meta(study.best_trial, storage=study._storage)
    assert {"curve.json", "student.pt"} <= {m.filename for m in metas}
    assert study.best_trial.user_attrs["weights_artifact"] is True


def test_export_reads_a_ray_study(searched) -> None:
    space, study, _ = searched
    best = select_trial(study).trial
    assert best.state == TrialState.COMPLETE and best.value == max(t.value for t in study.trials
                                                                   if t.state == TrialState.COMPLETE)
    cfg = export_config(space, best)
    assert cfg.optim.epochs == 4 and cfg.eval_test
    assert cfg.distill.method == best.params["distill.method"]
    assert cfg.optim.lr == best.params["optim.lr"]


def test_the_study_pruner_can_be_the_scheduler(tmp_path: Path, teacher_cache: Path, ray_address) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=3,
                      pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1})
    data["run"]["distill"]["method"] = "kd"
    space = load_space(write(tmp_path / "s.yaml", data))
    study = open_study(space, make_storage(space))
    for params in (GOOD, GOOD, WEAK):
        study.enqueue_trial(params)
    study = run_ray_search(space, stream=io.StringIO(), scheduler="pruner", max_concurrent=1, confirm=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    weak = study.trials[2]
    assert max(weak.intermediate_values) < 4 and weak.value == weak.intermediate_values[max(weak.intermediate_values)]


def test_multi_objective_runs_keep_curves_and_both_values(tmp_path: Path, teacher_cache: Path, ray_address) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=2,
                      second_objective="student_params", pruner={"name": "none"})
    data["run"]["distill"]["method"] = "kd"
    data["run"]["student"] = {"choices": ["digits_cnn_small", "digits_cnn_large"]}
    space = load_space(write(tmp_path / "s.yaml", data))
    study = run_ray_search(space, stream=io.StringIO(), confirm=False)
    assert len(study.trials) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        assert t.values[1] == t.user_attrs["student_params"]
        assert sorted(t.intermediate_values) == [1, 2, 3, 4] and t.values[0] == t.intermediate_values[4]


def test_a_failing_trial_is_fail_with_its_reason(tmp_path: Path, teacher_cache: Path, ray_address,
                                                 monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths of the space are the driver's, not the Ray worker's
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, n_trials=1)
    # The first choice is what the driver checks before the study starts; the trial draws the missing one.
    torch.save(create_model("digits_cnn_large", 10, in_channels=1).state_dict(), tmp_path / "teacher.pt")
    data["run"]["teacher"]["checkpoint"] = {"choices": ["teacher.pt", "missing-teacher.pt"]}
    space = load_space(write(tmp_path / "s.yaml", data))
    study = open_study(space, make_storage(space))
    study.enqueue_trial({"teacher.checkpoint": "missing-teacher.pt"})
    (trial,) = run_ray_search(space, stream=io.StringIO(), confirm=False).trials
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith("CheckpointError:") and str(tmp_path / "missing-teacher.pt") in reason
    assert "\n" not in reason
    assert "Traceback" in (Path(space.study.runs_dir) / "trial-00000" / "error.log").read_text()


def test_what_ray_prints_while_it_shuts_down_is_filtered_too(tmp_path: Path, teacher_cache: Path, monkeypatch,
                                                             capfd) -> None:
    """A lost node's dump can reach the driver until `ray.shutdown()` returns: the filter stays on through it."""
    import ackd_search.backends.ray_run as ray_run

    def shutdown() -> None:
        print("\x1b[33m(raylet, ip=10.0.0.2)\x1b[0m Raylet is terminated. Last 20 lines of the Raylet logs:",
              file=sys.stderr)
        print("    [state-dump] NodeManager ...", file=sys.stderr)

    monkeypatch.setattr(ray_run, "init_ray", lambda address: True)  # as if this call had joined the cluster
    monkeypatch.setattr(ray_run, "_tune", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray_run.ray, "shutdown", shutdown)
    data = tiny_space(tmp_path, name="shutdown", teacher_cache=teacher_cache)
    space = load_space(write(tmp_path / "space.yaml", data))
    run_ray_search(space, n_trials=1, stream=io.StringIO(), confirm=False)
    terminal = "".join(capfd.readouterr())
    assert "Raylet is terminated" not in terminal and "state-dump" not in terminal, terminal[-2000:]


def test_settings_that_cannot_work_are_refused_before_ray_starts(tmp_path: Path) -> None:
    data = tiny_space(tmp_path, second_objective="student_params", pruner={"name": "none"})
    data["run"]["student"] = {"choices": ["digits_cnn_small", "digits_cnn_large"]}  # a front needs a searched cost
    space = load_space(write(tmp_path / "s.yaml", data))
    with pytest.raises(StudyError, match="second_objective cannot prune; allowed: fifo"):
        run_ray_search(space, scheduler="asha")
    with pytest.raises(StudyError, match="ray option 'gpus' is unknown; allowed: cpus_per_trial"):
        run_ray_search(space, gpus=1)
    with pytest.raises(ConfigError, match=r"study.ray: gpus_per_trial: -1.0 is out of range"):
        run_ray_search(space, gpus_per_trial=-1.0)
    with pytest.raises(StudyError, match=r"Ray Client \(ray://\) is not supported"):
        run_ray_search(space, address="ray://head:10001")


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), *args]


def test_cli_ray_backend_continues_a_plain_study(tmp_path: Path, teacher_cache: Path, ray_address) -> None:
    path = write(tmp_path / "s.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache))
    run_search(load_space(path), n_trials=1, stream=io.StringIO(), confirm=False)  # the plain backend: first preset
    cli = subprocess.run(_cli("--space", str(path), "--backend", "ray", "--address", ray_address, "--n-trials", "2",
                              "--no-confirm"),
                         check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "study tiny:" in cli.stdout and "best search trial #" in cli.stdout
    trials = stored(load_space(path))
    assert len(trials) == 3 and all(t.state in FINISHED for t in trials)
    assert [t.user_attrs.get("preset") for t in trials[:2]] == ["reference", "kd"]  # Ray took the queued preset
    assert sorted(trials[1].intermediate_values) == [1, 2, 3, 4]


def test_ctrl_c_leaves_no_trial_running(tmp_path: Path, teacher_cache: Path, ray_address) -> None:
    data = tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False, pruner={"name": "none"})
    data["run"]["optim"]["epochs"] = 60  # long enough to be interrupted mid-trial
    path = write(tmp_path / "s.yaml", data)
    proc = subprocess.Popen(_cli("--space", str(path), "--backend", "ray", "--address", ray_address,
                                 "--n-trials", "4", "--no-confirm"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine takes a while to start Ray and a trial
        while time.monotonic() < deadline and not stored_epochs(tmp_path / "tiny.db") and proc.poll() is None:
            time.sleep(0.3)
        assert stored_epochs(tmp_path / "tiny.db"), "no trial reported an epoch before the deadline"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    trials = stored(load_space(path))
    assert trials and all(t.state in FINISHED for t in trials), [t.state for t in trials]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"] for t in interrupted)
    assert any(t.intermediate_values for t in interrupted)  # the curve so far is kept


def test_a_rerun_after_a_killed_driver_is_free_and_the_count_is_this_runs(tmp_path: Path, teacher_cache: Path,
                                                                        ray_address) -> None:
    # Issue #20: a re-run after a driver kill counted against --n-trials, and the progress said "trial 6/4".
    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path, teacher_cache=teacher_cache, presets=False,
                                                             n_trials=4, pruner={"name": "none"})))
    study = open_study(space, make_storage(space), log=lambda _: None)
    killed = study.ask()
    space.suggest(killed)  # the killed driver's trial: its parameters drawn, then no more heartbeats
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(space.study.grace_period_s + 1)
    out = io.StringIO()
    run_ray_search(space, n_trials=2, stream=out, max_concurrent=1, confirm=False)
    trials = stored(space)
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert trials[0].state == TrialState.FAIL and trials[1].user_attrs["retry_of"] == 0
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 3
    lines = [line for line in out.getvalue().splitlines() if line.startswith("trial ")]
    assert [line.split()[1] for line in lines] == ["re-run", "1/2", "2/2"], lines  # this run's 2, not the space's 4


def test_ray_stops_trials_by_the_studys_own_pruner_by_default(tmp_path: Path) -> None:
    """ASHA's default would stop the bottom 75 % at every rung, far harsher than the study's pruner."""
    from ackd_search.backends.ray_run import resolve_ray_options, scheduler_kind

    space = load_space(write(tmp_path / "s.yaml", tiny_space(tmp_path)))
    assert scheduler_kind(space, resolve_ray_options(space)) == "pruner"
    assert scheduler_kind(space, resolve_ray_options(space, scheduler="asha")) == "asha"
