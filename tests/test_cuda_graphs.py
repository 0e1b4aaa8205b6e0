"""The captured training step (`run.cuda_graphs`): on a CPU, the graph-safe step (static batch buffers, tensor lr,
fused SGD, on-device sums) run eagerly against the plain step, a failed capture and `on` without CUDA falling back
in one line; with CUDA, a captured run's checkpoint and resume (skipped without CUDA). Every branch of the step,
the eager fallbacks and the CUDA curves of eager against captured runs: tests/test_captured_step.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import ackd_search.training.checkpoints as trainer
from ackd_search.config import AckdConfig, DataConfig, DistillConfig, OptimConfig, RunConfig, kd_distill
from ackd_search.data.sources import get_splits
from ackd_search.models import create_model
from ackd_search.training.captured import CapturedStep as _CapturedStep
from ackd_search.training.loop import Run as _Run
from ackd_search.training.loop import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def config(method: str, device: str = "cpu", epochs: int = 2, cuda_graphs: str = "off", **ackd) -> RunConfig:
    distill = kd_distill() if method == "kd" else DistillConfig(method="ackd", ackd=AckdConfig(**ackd))
    return RunConfig(student="digits_cnn_small", data=DataConfig(name="digits", limit=300),
                     optim=OptimConfig(epochs=epochs, batch_size=32), distill=distill, device=device,
                     cuda_graphs=cuda_graphs)


def make_run(cfg: RunConfig) -> _Run:
    torch.manual_seed(123)  # the same random teacher for every run of a test
    teacher = create_model("digits_cnn_large", 10, in_channels=1)
    return _Run(cfg, None, splits=get_splits(cfg.data), teacher=teacher, teacher_info=None)


def trained_state(run: _Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in run.distiller.trained_state().items()}


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=tol, atol=tol, msg=key)


# --- on any machine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "ackd"), [("kd", {}), ("ackd", {"aux_placements": [2, 2]}),
                                              ("ackd", {"aux_placements": [1], "adv_warmup_epochs": 120.0})])
def test_graph_safe_step_run_eagerly_matches_the_plain_step(method: str, ackd: dict) -> None:
    """Static buffers, the lr in a device tensor read by fused SGD, sums added on the device: the same training as
    the plain eager step, epoch for epoch (the adversary switching on at epoch 2 included)."""
    cfg = config(method, epochs=3, **ackd)
    plain, graph_safe = make_run(cfg), make_run(cfg)
    graph_safe.captured, graph_safe._engine_ready = _CapturedStep(graph_safe, capture=False), True
    for epoch in range(cfg.optim.epochs):
        expected, _ = plain.train_epoch(epoch)
        got, _ = graph_safe.train_epoch(epoch)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), epoch
        plain.scheduler.step()
        graph_safe.scheduler.step()
    assert graph_safe.captured.static_x is not None  # the full batches went through the static buffers
    assert_close_states(trained_state(graph_safe), trained_state(plain), tol=1e-5)
    # Outside the step the optimizer is the eager one: float lr, default implementation (what checkpoints hold).
    group = graph_safe.optimizer.param_groups[0]
    assert isinstance(group["lr"], float) and group["fused"] is None and group["foreach"] is None


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_lr_tensor_follows_the_schedule_in_place() -> None:
    cfg = config("kd", epochs=8)
    cfg.optim.lr = 0.1
    run = make_run(cfg)
    step = _CapturedStep(run, capture=False)
    lr_tensor = step.optimizer.lrs[0]
    seen = []
    for epoch in range(cfg.optim.epochs):
        step.begin_epoch(epoch)
        seen.append(lr_tensor.item())
        run.scheduler.step()
    assert step.optimizer.lrs[0] is lr_tensor  # one tensor, refilled: a captured graph keeps reading it
    assert seen == pytest.approx([0.1] * 5 + [0.01, 0.001, 0.0001], rel=1e-6)


def test_cuda_graphs_on_without_cuda_says_so_in_one_line_and_trains_eagerly(capsys) -> None:
    cfg = config("kd", cuda_graphs="on")
    on = train(cfg, splits=get_splits(cfg.data), teacher=make_run(cfg).teacher, teacher_info=None)
    lines = [line for line in capsys.readouterr().err.splitlines() if "cuda_graphs" in line]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "continuing eagerly" in lines[0]
    assert on.cuda_graphs.startswith("eager: ")
    off_cfg = replace(cfg, cuda_graphs="off")
    off = train(off_cfg, splits=get_splits(cfg.data), teacher=make_run(cfg).teacher, teacher_info=None)
    assert off.cuda_graphs == "off"
    assert [h["terms"] for h in on.history] == [h["terms"] for h in off.history]  # the same computation


def test_auto_is_eager_on_a_cpu() -> None:
    cfg = config("kd", epochs=1, cuda_graphs="auto")
    result = train(cfg, splits=get_splits(cfg.data), teacher=make_run(cfg).teacher, teacher_info=None)
    assert result.cuda_graphs == "off"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a capture attempt on a CPU must fail")
def test_a_failed_capture_is_one_line_and_the_run_goes_on_eagerly(capsys, monkeypatch) -> None:
    """Forced to capture on a CPU, the capture fails; the batch it held and every later one train eagerly, with
    the numbers of a plain eager run."""
    monkeypatch.setattr(_CapturedStep, "WARMUP_STEPS", 0)
    cfg = config("kd", epochs=2)
    plain, forced = make_run(cfg), make_run(cfg)
    forced.captured, forced._engine_ready = _CapturedStep(forced), True
    for epoch in range(cfg.optim.epochs):
        assert forced.train_epoch(epoch)[0] == plain.train_epoch(epoch)[0]
    lines = [line for line in capsys.readouterr().err.splitlines() if "cuda_graphs" in line]
    assert len(lines) == 1 and "capture failed" in lines[0] and lines[0].endswith("continuing eagerly")
    assert forced.graphs_status.startswith("eager: capture failed")
    assert_close_states(trained_state(forced), trained_state(plain), tol=0)


def test_cuda_graphs_setting_is_validated() -> None:
    from ackd_search.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="cuda_graphs: 'yes' is not allowed; allowed: auto, on, off"):
        from_dict(RunConfig, {"cuda_graphs": "yes"})


# --- with CUDA -------------------------------------------------------------------------------------------------


@needs_cuda
def test_captured_run_resumes_and_checkpoints_like_an_eager_one(tmp_path) -> None:
    cfg = replace(config("ackd", device="cuda", epochs=3, aux_placements=[2]), cuda_graphs="on",
                  output_dir=str(tmp_path / "run"))
    teacher = make_run(config("ackd")).teacher
    result = train(cfg, splits=get_splits(cfg.data), teacher=teacher, teacher_info=None)
    assert result.cuda_graphs == "captured"
    state = torch.load(tmp_path / "run" / trainer.CHECKPOINT, weights_only=True)
    assert all(not g.get("capturable", False) for g in state["adversary_optimizer"]["param_groups"])
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
