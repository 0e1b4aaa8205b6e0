"""Tests for ackd_search.trainer: one training run on digits with the tiny nets, on CPU.

Pinned: KD and student-alone runs learn; the per-epoch reporter; bit-exact resume after a crash (KD and ACKD,
whose discriminator has its own optimiser); determinism per seed; checkpoint, non-finite-loss and device errors;
the step / cosine schedules; what a run writes to `output_dir`. Teachers are trained into a tmp cache."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ackd_search.config import (
    AckdConfig,
    DataConfig,
    DistillConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    kd_distill,
    load_run_config,
    to_dict,
)
from ackd_search.data import DeviceLoader
from ackd_search.data.sources import get_splits
from ackd_search.errors import CheckpointError
from ackd_search.models import count_flops, count_parameters, create_model
from ackd_search.training.checkpoints import CHECKPOINT
from ackd_search.training.device import resolve_device
from ackd_search.training.loop import NonFiniteLossError, Reporter, RunResult, evaluate
from ackd_search.training.runner import run_training

TEACHER_EPOCHS = 5  # the large digits CNN reaches ~95% val accuracy in 5 epochs


class SimulatedCrash(Exception):
    """Raised from a reporter to stop a run after an epoch, as a killed worker would."""


def crash_after(last_epoch: int) -> Reporter:
    def reporter(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == last_epoch:
            raise SimulatedCrash

    return reporter


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One teacher cache for the module: the first KD/ACKD run trains the teacher, the rest read it."""
    return tmp_path_factory.mktemp("teachers")


def distill_for(method: str) -> DistillConfig:
    if method == "kd":
        return kd_distill()
    if method == "ackd":  # one learner before the last stage keeps ACKD fast; its discriminator is still on
        return DistillConfig(method="ackd", ackd=AckdConfig(aux_placements=[2]))
    return DistillConfig(method=method)


def run_config(cache: Path, method: str = "kd", epochs: int = 3, output_dir: Path | None = None, seed: int = 0,
               limit: int | None = None, **optim: Any) -> RunConfig:
    return RunConfig(
        seed=seed,
        student="digits_cnn_small",
        data=DataConfig(name="digits", limit=limit),
        optim=OptimConfig(epochs=epochs, **optim),
        teacher=TeacherConfig(arch="digits_cnn_large", cache_dir=str(cache), optim=OptimConfig(epochs=TEACHER_EPOCHS)),
        distill=distill_for(method),
        device="cpu",
        output_dir=str(output_dir) if output_dir else None,
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs"


def val_curve(result: RunResult) -> list[float]:
    return [h["val_acc"] for h in result.history]


# --- runs that learn -------------------------------------------------------------------------------------------


def test_kd_run_lowers_training_loss_and_beats_chance(teacher_cache: Path) -> None:
    result = run_training(run_config(teacher_cache, "kd", epochs=8))
    losses = [h["terms"]["loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.final_val_acc > 50.0, val_curve(result)  # 10 classes: chance is 10%
    assert result.best_val_acc == max(val_curve(result))
    assert result.teacher is not None and result.teacher["val_acc"] > 80.0
    assert set(result.history[-1]["terms"]) >= {"ce", "kd", "loss"}


def test_student_alone_reports_every_epoch_in_order(tmp_path: Path) -> None:
    calls: list[tuple[int, dict[str, Any]]] = []
    result = run_training(run_config(tmp_path / "unused-cache", "student", epochs=3),
                   reporter=lambda epoch, metrics: calls.append((epoch, metrics)))
    assert [epoch for epoch, _ in calls] == [1, 2, 3]
    for epoch, metrics in calls:
        assert metrics["epoch"] == epoch
        assert set(metrics) >= {"val_acc", "val_loss", "lr", "train_s", "images_per_s", "terms"}
        assert 0.0 <= metrics["val_acc"] <= 100.0
        assert set(metrics["terms"]) == {"ce", "loss"}
        assert all(math.isfinite(v) for v in metrics["terms"].values())
    assert [m for _, m in calls] == result.history
    assert result.teacher is None
    assert not (tmp_path / "unused-cache").exists()  # the student alone never touches the teacher cache
    assert result.final_val_acc > 30.0, val_curve(result)


# --- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kd", "ackd"])
def test_resume_after_crash_matches_uninterrupted_run(teacher_cache: Path, tmp_path: Path, method: str) -> None:
    epochs = 4
    whole = run_training(run_config(teacher_cache, method, epochs, tmp_path / "whole", limit=300))

    cfg = run_config(teacher_cache, method, epochs, tmp_path / "resumed", limit=300)
    with pytest.raises(SimulatedCrash):
        run_training(cfg, reporter=crash_after(2))
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert saved["epochs_done"] == 2

    seen: list[tuple[int, bool]] = []
    resumed = run_training(cfg, reporter=lambda epoch, metrics: seen.append((epoch, metrics.get("resumed", False))))
    # The caller sees the whole curve: the restored epochs replayed (marked), then only the missing ones trained.
    assert seen == [(1, True), (2, True), (3, False), (4, False)]
    assert val_curve(resumed) == val_curve(whole)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history]
    assert_same_weights(resumed.student_state, whole.student_state)

    # Everything training changes matches too: learners, attention, discriminator and its own Adam state.
    final_whole = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    final_resumed = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert_same_weights(final_resumed["distiller"], final_whole["distiller"])
    if method == "ackd":
        assert any(key.startswith("discriminator.") for key in final_whole["distiller"])
        adam_whole, adam_resumed = final_whole["adversary_optimizer"], final_resumed["adversary_optimizer"]
        assert adam_whole["state"], "the discriminator's optimiser should have state after training"
        for index, state in adam_whole["state"].items():
            for name, value in state.items():
                assert torch.equal(adam_resumed["state"][index][name], value), (index, name)


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    cfg = run_config(tmp_path / "cache", "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    first = run_training(cfg)
    again = run_training(cfg, reporter=lambda epoch, m: None if m.get("resumed") else pytest.fail("trained"))
    assert val_curve(again) == val_curve(first)
    assert_same_weights(again.student_state, first.student_state)


# --- determinism -----------------------------------------------------------------------------------------------


def test_same_config_and_seed_give_identical_runs_cold_or_warm_cache(tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"
    cold = run_training(run_config(cache, "kd", epochs=3, limit=400))  # trains the teacher first
    warm = run_training(run_config(cache, "kd", epochs=3, limit=400))  # reads it from the cache
    assert val_curve(warm) == val_curve(cold)
    assert [h["terms"] for h in warm.history] == [h["terms"] for h in cold.history]
    assert_same_weights(warm.student_state, cold.student_state)


def test_another_seed_gives_other_weights(tmp_path: Path) -> None:
    seed0 = run_training(run_config(tmp_path, "student", epochs=2, seed=0, limit=300))
    seed1 = run_training(run_config(tmp_path, "student", epochs=2, seed=1, limit=300))
    assert not torch.equal(seed0.student_state["stem.0.weight"], seed1.student_state["stem.0.weight"])


# --- errors ----------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(run_config(tmp_path, "student", epochs=1, output_dir=out, limit=200))
    with pytest.raises(CheckpointError, match="different run config"):
        run_training(run_config(tmp_path, "student", epochs=1, output_dir=out, limit=200, lr=0.01))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-checkpoint"])
def test_unreadable_checkpoint_is_a_one_line_error_naming_the_path(tmp_path: Path, damage: str) -> None:
    cfg = run_config(tmp_path, "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    path = tmp_path / "run" / CHECKPOINT
    if damage == "truncated":
        with pytest.raises(SimulatedCrash):
            run_training(cfg, reporter=crash_after(1))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.parent.mkdir(parents=True)
        if damage == "not-a-checkpoint":
            torch.save(torch.zeros(3), path)  # readable, but not a training checkpoint
        else:
            path.write_bytes(b"\x80\x02 not a torch file" if damage == "garbage" else b"")
    with pytest.raises(CheckpointError) as info:
        run_training(cfg)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only` set to `False`" not in message  # never advise loading a damaged file unsafely


def test_nan_teacher_stops_the_run_at_the_first_batch(tmp_path: Path) -> None:
    """A diverged teacher checkpoint (NaN weights) makes the KD loss NaN from the first batch."""
    teacher = create_model("digits_cnn_large", 10, in_channels=1)
    with torch.no_grad():
        teacher.head.fc.weight.fill_(float("nan"))
    torch.save(teacher.state_dict(), tmp_path / "nan-teacher.pt")
    cfg = run_config(tmp_path, "kd", epochs=3)
    cfg.teacher.checkpoint = str(tmp_path / "nan-teacher.pt")
    with pytest.raises(NonFiniteLossError, match="epoch 1, batch 1$"):
        run_training(cfg, reporter=lambda epoch, metrics: pytest.fail("no epoch should finish"))


def test_diverging_lr_stops_the_run_within_the_first_epoch(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "student", epochs=5, lr=1e6)
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        run_training(cfg, reporter=lambda epoch, metrics: pytest.fail("no epoch should finish"))


@pytest.mark.parametrize("name", ["tpu", "bogus:0", "mps"])
def test_unknown_device_is_a_one_line_value_error(tmp_path: Path, name: str) -> None:
    cfg = run_config(tmp_path, "student", epochs=1)
    cfg.device = name
    with pytest.raises(ValueError, match=f"unknown device '{name}'; allowed: auto, cpu, cuda, cuda:N$"):
        run_training(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


# --- schedules -------------------------------------------------------------------------------------------------


def test_cpu_threads_sets_torch_threads_on_the_cpu(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "student", epochs=1, limit=200)
    cfg.cpu_threads = 1
    torch.set_num_threads(2)
    try:
        run_training(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_step_schedule_is_scaled_to_the_budget(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "student", epochs=8, limit=100, lr=0.1)
    # The recipe's 150/180/210 of 240 epochs become epochs 5/6/7 of 8.
    assert cfg.optim.scaled_milestones() == [5, 6, 7]
    lrs = [h["lr"] for h in run_training(cfg).history]
    assert lrs == pytest.approx([0.1] * 5 + [0.01, 0.001, 0.0001], rel=1e-9)


def test_cosine_schedule_anneals_to_zero_over_the_budget(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "student", epochs=5, limit=100, lr=0.1, schedule="cosine")
    lrs = [h["lr"] for h in run_training(cfg).history]
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 5)) for e in range(5)], rel=1e-9)
    assert lrs[0] == pytest.approx(0.1)


# --- what a run records ----------------------------------------------------------------------------------------


def test_output_dir_holds_config_result_and_a_loadable_student(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = run_config(tmp_path, "student", epochs=2, output_dir=out)
    result = run_training(cfg)

    assert to_dict(load_run_config(out / "config.yaml")) == to_dict(cfg)
    summary = json.loads((out / "result.json").read_text())
    assert summary["final_val_acc"] == result.final_val_acc
    assert summary["student_params"] == result.student_params
    assert summary["student_flops"] == result.student_flops
    assert len(summary["history"]) == 2 and "student_state" not in summary

    fresh = create_model(cfg.student, 10, in_channels=1)
    assert result.student_params == count_parameters(fresh) > 0
    assert result.student_flops == count_flops(fresh, (1, 1, 8, 8)) > 0
    fresh.load_state_dict(torch.load(out / "student.pt", weights_only=True))  # strict: exactly the student
    splits = get_splits(cfg.data)
    loader = DeviceLoader(splits.val, 256, "cpu", splits.mean, splits.std)
    val_acc, _ = evaluate(fresh, loader, contextlib.nullcontext)
    assert val_acc == pytest.approx(result.final_val_acc)


# --- a checkpoint belongs to its study, trial and code version ---------------------------------------------------


def test_checkpoint_records_identity_and_version(tmp_path: Path) -> None:
    from ackd_search import __version__

    identity = {"study": "a", "storage": "sqlite:///a.db", "trial": 0}
    cfg = run_config(tmp_path, "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    with pytest.raises(SimulatedCrash):
        run_training(cfg, crash_after(1), identity=identity)
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert saved["identity"] == identity and saved["version"] == __version__
    resumed = run_training(cfg, identity=dict(identity))  # the same owner resumes
    assert [h["epoch"] for h in resumed.history] == [1, 2]


@pytest.mark.parametrize(("saved", "asked", "expected"), [
    ({"study": "a", "storage": "sqlite:///a.db", "trial": 0}, {"study": "b", "storage": "sqlite:///a.db", "trial": 0},
     "belongs to study 'a' (storage 'sqlite:///a.db', trial 0), not study 'b' (storage 'sqlite:///a.db', trial 0)"),
    ({"study": "a", "storage": "sqlite:///a.db", "trial": 0}, {"study": "a", "storage": "sqlite:///b.db", "trial": 0},
     "not study 'a' (storage 'sqlite:///b.db', trial 0)"),
    ({"study": "a", "trial": 3}, None, "belongs to study 'a' (trial 3), not no study (a plain training run)"),
    (None, {"study": "a", "trial": 3}, "belongs to no study (a plain training run), not study 'a' (trial 3)"),
])
def test_checkpoint_of_another_study_is_refused_in_one_line(tmp_path: Path, saved, asked, expected: str) -> None:
    cfg = run_config(tmp_path, "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    with pytest.raises(SimulatedCrash):
        run_training(cfg, crash_after(1), identity=saved)
    with pytest.raises(CheckpointError) as info:
        run_training(cfg, identity=asked)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "run" / CHECKPOINT)) and expected in message
    assert message.endswith("delete it or use a new runs folder") and "\n" not in message


def test_checkpoint_of_another_code_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ackd_search.training.checkpoints as trainer_module

    cfg = run_config(tmp_path, "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    with pytest.raises(SimulatedCrash):
        run_training(cfg, crash_after(1))
    written = trainer_module.__version__
    monkeypatch.setattr(trainer_module, "__version__", "99.0")
    with pytest.raises(CheckpointError, match=f"written by ackd-search {written}, this is 99.0; delete it"):
        run_training(cfg)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    del state["version"]  # a checkpoint from before versions were recorded
    torch.save(state, tmp_path / "run" / CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"written by an older ackd-search \(no version recorded\)"):
        run_training(cfg)


def test_switching_cuda_graphs_does_not_orphan_a_checkpoint(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "student", epochs=2, output_dir=tmp_path / "run", limit=200)
    with pytest.raises(SimulatedCrash):
        run_training(cfg, crash_after(1))
    cfg.cuda_graphs = "off"  # how the step runs, not what it computes
    assert [h["epoch"] for h in run_training(cfg).history] == [1, 2]


def test_trainer_does_not_import_the_teachers_module() -> None:
    import ast

    import ackd_search.training.loop as trainer_module

    tree = ast.parse(Path(trainer_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "ackd_search.training.teachers" not in imported
