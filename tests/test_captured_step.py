"""Every branch of the step a CUDA graph captures, checked on a CPU against the plain eager step; the eager fallback
when preparing, warming up or capturing fails; and, with CUDA, eager against captured curves (skipped here).

On a CPU, `CapturedStep(run, capture=False)` runs the step the graph would hold: static batch buffers, fused SGD
with its lr in a device tensor (filled per epoch from the schedule), the epoch's loss weights in device tensors
(ACKD's collaborative ramp, the adversary's warm-up switching the step shape), on-device sums, the cached teacher
rows gathered inside the step (whole arrays on the device, or the epoch's rows gathered at its start), ACKD's
features as the adversary's input (connectors whose first gradient comes when the adversary starts). Each run is
compared with the plain eager step on tiny digits nets: loss terms per epoch and final weights within fp32
round-off (fused and for-each SGD round differently, nothing else differs)."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ackd_search.config import AckdConfig, DataConfig, DistillConfig, OptimConfig, RunConfig, kd_distill
from ackd_search.data.sources import get_splits
from ackd_search.models import create_model
from ackd_search.training import teacher_outputs
from ackd_search.training.captured import CapturedStep
from ackd_search.training.graph_safe import GraphSafeOptimizer
from ackd_search.training.loop import Run
from ackd_search.training.output_cache import teacher_outputs_for

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = 1e-5  # fp32: fused and for-each SGD round differently; a wrong step is off by far more
EPOCHS = 4  # scaled milestones [2, 3, 4]: the lr drops at epochs 2 and 3; a 120-epoch adversary warm-up ends at 2
SGD_MODULE = importlib.import_module("torch.optim.sgd")  # torch.optim's namespace drops the module's name
FEATURES = {"aux_placements": [1], "adv_input": "features", "adv_warmup_epochs": 120.0}


def config(method: str, device: str = "cpu", epochs: int = EPOCHS, limit: int | None = 300, cache: str = "off",
           **ackd) -> RunConfig:
    distill = kd_distill() if method == "kd" else DistillConfig(method="ackd", ackd=AckdConfig(**ackd))
    cfg = RunConfig(student="digits_cnn_small", data=DataConfig(name="digits", limit=limit),
                    optim=OptimConfig(epochs=epochs, batch_size=32), distill=distill, device=device,
                    cuda_graphs="off")
    cfg.teacher.output_cache = cache
    return cfg


def teacher() -> torch.nn.Module:
    torch.manual_seed(123)  # the same random teacher for every run of a test
    return create_model("digits_cnn_large", 10, in_channels=1)


def make_run(cfg: RunConfig, outputs=None) -> Run:
    return Run(cfg, None, splits=get_splits(cfg.data), teacher=teacher(), teacher_info=None, teacher_outputs=outputs,
               teacher_output_cache="used" if outputs is not None else "off")


def cached_outputs(cfg: RunConfig, cache_dir: Path, placement: str):
    """The real teacher-output cache of `cfg` (computed into `cache_dir`), read with `placement`."""
    splits = get_splits(cfg.data)
    info = {"sha256": "random-teacher-123", "cache_entry": str(cache_dir)}
    device = torch.device(cfg.device)
    outputs, status = teacher_outputs_for(cfg, splits, teacher().to(device), info, device, placement)
    assert status == "used"
    return outputs


def graph_safe(run: Run, capture: bool = False) -> Run:
    run.captured, run._engine_ready = CapturedStep(run, capture=capture), True
    return run


def train_epochs(run: Run, epochs: int) -> list[dict[str, float]]:
    curve = []
    for epoch in range(epochs):
        terms, _ = run.train_epoch(epoch)
        curve.append(terms)
        run.scheduler.step()
    return curve


def weights(run: Run, parameters_only: bool = False) -> dict[str, torch.Tensor]:
    state = dict(run.distiller.named_parameters()) if parameters_only else run.distiller.trained_state()
    return {k: v.detach().cpu().float() for k, v in state.items() if not k.startswith("teacher.")}


def assert_same_training(got: Run, got_curve: list[dict], expected: Run, expected_curve: list[dict],
                         tol: float = TOL, parameters_only: bool = False) -> None:
    for epoch, (g, e) in enumerate(zip(got_curve, expected_curve)):
        assert g.keys() == e.keys(), epoch
        assert g == pytest.approx(e, rel=tol, abs=tol), epoch
    a, b = weights(got, parameters_only), weights(expected, parameters_only)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


# --- the optimizer -----------------------------------------------------------------------------------------------


def sgd_steps(fused: bool, ahead: bool) -> list[torch.Tensor]:
    """Three SGD steps where the second parameter gets its first gradient at the second step: the parameters and
    momentum buffers after them."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn(5, 3), None], [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)
    if ahead:
        GraphSafeOptimizer(sgd, torch.device("cpu")).ensure_momentum_buffers()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        sgd.step()
    return [p.detach().clone() for p in params] + [sgd.state[p]["momentum_buffer"] for p in params]


def test_zero_momentum_buffers_are_sgds_first_step_bit_for_bit() -> None:
    """A zero buffer created ahead is what SGD's first step stores (buf = grad): `0 * m + grad` is `grad` exactly,
    for a parameter whose first gradient comes at the first step or a later one; the fused kernel then agrees."""
    eager = sgd_steps(fused=False, ahead=False)
    for a, b in zip(sgd_steps(fused=False, ahead=True), eager):
        assert torch.equal(a, b)
    for a, b in zip(sgd_steps(fused=True, ahead=True), eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="got NoneType"):  # the crash: torch's fused SGD without buffers ahead
        sgd_steps(fused=True, ahead=False)


def test_buffers_are_refused_with_dampening() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="dampening 0.5"):
        GraphSafeOptimizer(sgd, torch.device("cpu")).ensure_momentum_buffers()


# --- the graph-safe step against the plain one --------------------------------------------------------------------

CASES = {
    "kd": ("kd", {}),
    "ackd-collab-ramp": ("ackd", {"aux_placements": [2, 2]}),
    "ackd-probs-adversary-starts": ("ackd", {"aux_placements": [1], "adv_warmup_epochs": 120.0}),
    "ackd-features-adversary-starts": ("ackd", FEATURES),
    "ackd-features-ensemble": ("ackd", {**FEATURES, "adv_real": "ensemble"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_safe_step_matches_the_plain_step(case: str) -> None:
    """Over 4 epochs: the lr drops twice (read by fused SGD from its device tensor), ACKD's weights change per
    epoch, and where the adversary starts at epoch 2 the step shape changes and parameters get their first
    gradient (the feature connectors: fused SGD was handed None for their momentum buffers there)."""
    method, ackd = CASES[case]
    cfg = config(method, **ackd)
    plain, safe = make_run(cfg), graph_safe(make_run(cfg))
    keys = []
    expected = train_epochs(plain, EPOCHS)
    got = []
    for epoch in range(EPOCHS):
        terms, _ = safe.train_epoch(epoch)
        got.append(terms)
        keys.append(safe.captured.key)
        assert safe.captured.optimizer.lrs[0].item() == pytest.approx(safe.optimizer.param_groups[0]["lr"])
        safe.scheduler.step()
    assert safe.captured.failed is None and safe.captured.static_x is not None
    assert_same_training(safe, got, plain, expected)
    if "adversary-starts" in case:
        assert keys == [False, False, True, True]  # the step shape changed once, at the adversary's start
        assert "adv_d" in got[2] and "adv_d" not in got[1]
    group = safe.optimizer.param_groups[0]  # outside the step the optimizer is the eager one
    assert isinstance(group["lr"], float) and group["fused"] is None and group["foreach"] is None


@pytest.mark.parametrize("placement", ["device", "epoch", "mapped"])
@pytest.mark.parametrize("case", ["kd", "ackd-features-adversary-starts"])
def test_graph_safe_step_with_the_teacher_cache(tmp_path: Path, case: str, placement: str) -> None:
    """The cached rows inside the step: whole arrays on the device (one index op), the epoch's rows gathered at
    its start into a buffer filled in place (indexed by the batch's positions), or gathered from the memory map
    (a CPU run); ACKD's features case reads the teacher's pooled features from the cache as well."""
    method, ackd = CASES[case]
    cfg = config(method, cache="on", **ackd)
    plain = make_run(cfg, cached_outputs(cfg, tmp_path, "mapped"))
    outputs = cached_outputs(cfg, tmp_path, placement)
    assert outputs.placement == placement and outputs.has_pooled == (method == "ackd")
    safe = graph_safe(make_run(cfg, outputs))
    buffers = {k: t.data_ptr() for k, t in outputs.tensors.items()}
    expected, got = train_epochs(plain, EPOCHS), train_epochs(safe, EPOCHS)
    assert_same_training(safe, got, plain, expected)
    assert {k: t.data_ptr() for k, t in outputs.tensors.items()} == buffers  # filled in place: a graph stays valid
    assert (safe.captured.static_rows is not None) == (placement != "mapped")


def test_the_cache_gives_the_live_teachers_training(tmp_path: Path) -> None:
    """Cached (fp32-stored digits) teacher outputs train as the live teacher does, in the graph-safe step."""
    cfg = config("ackd", cache="on", **FEATURES)
    live, safe = make_run(cfg), graph_safe(make_run(cfg, cached_outputs(cfg, tmp_path, "epoch")))
    assert_same_training(safe, train_epochs(safe, EPOCHS), live, train_epochs(live, EPOCHS), tol=1e-4)


# --- falling back to the eager step ----------------------------------------------------------------------------


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "cuda_graphs" in line]


def test_a_failed_warm_up_is_one_line_and_the_trial_goes_on_eagerly(capsys, monkeypatch) -> None:
    """A warm-up step that raises hands the run to the eager step, the failed batch included."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected warm-up failure")

    monkeypatch.setattr(CapturedStep, "_warmup_step", broken)
    cfg = config("ackd", **FEATURES)
    plain, forced = make_run(cfg), graph_safe(make_run(cfg), capture=True)
    expected, got = train_epochs(plain, EPOCHS), train_epochs(forced, EPOCHS)
    lines = err_lines(capsys)
    assert len(lines) == 1 and "warm-up failed: RuntimeError: injected warm-up failure" in lines[0], lines
    assert lines[0].endswith("continuing eagerly") and forced.graphs_status.startswith("eager: warm-up failed")
    assert_same_training(forced, got, plain, expected, tol=0.0)


def test_the_fused_step_failing_in_a_later_warm_up_falls_back(capsys, monkeypatch) -> None:
    """The shape of the crash: the fused SGD refusing its arguments at the second warm-up step (after one
    graph-safe step trained). The trial goes on eagerly, one line, its weights within round-off of the plain run's
    (the BN running statistics, not compared, saw the failed step's forward as well as its eager retry)."""
    fused = SGD_MODULE._fused_sgd
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("expected Tensor as element 39 in argument 2, but got NoneType")
        return fused(*args, **kwargs)

    monkeypatch.setattr(SGD_MODULE, "_fused_sgd", second_fails)
    cfg = config("kd")
    plain, forced = make_run(cfg), graph_safe(make_run(cfg), capture=True)
    expected, got = train_epochs(plain, EPOCHS), train_epochs(forced, EPOCHS)
    lines = err_lines(capsys)
    assert len(lines) == 1 and "warm-up failed: TypeError: expected Tensor" in lines[0], lines
    assert_same_training(forced, got, plain, expected, parameters_only=True)


def test_warm_up_then_a_failed_capture_on_a_cpu(capsys) -> None:
    """On a CPU the warm-up steps run (graph-safe, no side stream) and the capture fails: one line, then eager."""
    cfg = config("ackd", aux_placements=[2, 2])
    plain, forced = make_run(cfg), graph_safe(make_run(cfg), capture=True)
    expected, got = train_epochs(plain, EPOCHS), train_epochs(forced, EPOCHS)
    lines = err_lines(capsys)
    assert len(lines) == 1 and "capture failed" in lines[0], lines
    assert forced.captured.warm == CapturedStep.WARMUP_STEPS
    assert_same_training(forced, got, plain, expected)


def test_an_optimizer_the_graph_cannot_take_trains_eagerly(capsys) -> None:
    cfg = config("kd")
    plain, forced = make_run(cfg), make_run(cfg)
    for run in (plain, forced):
        run.optimizer.param_groups[0]["dampening"] = 0.5
    graph_safe(forced)
    expected, got = train_epochs(plain, 2), train_epochs(forced, 2)
    lines = err_lines(capsys)
    assert len(lines) == 1 and "dampening 0.5" in lines[0], lines
    assert_same_training(forced, got, plain, expected, tol=0.0)


# --- with CUDA: eager against captured -----------------------------------------------------------------------

# bf16 autocast in both runs, cuDNN's deterministic algorithms: the captured graph replays the eager step's kernels,
# but fused and for-each SGD round differently, and that grows over a few hundred steps. A wrong step (a stale lr,
# another image's teacher rows, a missed update) moves the curves by far more: the negative control checks it.
CURVE_TOL = 3e-2
CUDA_CASES = {
    "kd": ("kd", {}),
    "ackd-probs": ("ackd", {"aux_placements": [2, 2], "adv_warmup_epochs": 120.0}),
    "ackd-features": ("ackd", {"aux_placements": [1, 2], "adv_input": "features", "adv_warmup_epochs": 120.0}),
}


@pytest.fixture
def deterministic_cudnn(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def cuda_run(case: str, cuda_graphs: str, cache_dir: Path | None, placement: str = "auto") -> Run:
    method, ackd = CUDA_CASES[case]
    cfg = replace(config(method, device="cuda", epochs=6, limit=None, cache="on" if cache_dir else "off", **ackd),
                  cuda_graphs=cuda_graphs)
    cfg.optim.schedule = "cosine"  # a new lr every epoch: a graph reading a stale one would drift
    outputs = cached_outputs(cfg, cache_dir, placement) if cache_dir else None
    run = make_run(cfg, outputs)
    run.run()
    return run


def curve(run: Run) -> list[dict[str, float]]:
    return [{**h["terms"], "val_loss": h["val_loss"]} for h in run.history]


def assert_close_curves(got: list[dict], expected: list[dict], tol: float) -> None:
    for epoch, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys(), epoch
        for name, value in e.items():
            assert g[name] == pytest.approx(value, rel=tol, abs=1e-3), (epoch + 1, name, g[name], value)


def relative_weight_distance(a: Run, b: Run) -> float:
    wa, wb = weights(a), weights(b)
    return max(float((wa[k] - wb[k]).norm() / (wb[k].norm() + 1e-6)) for k in wa if wa[k].is_floating_point())


@needs_cuda
@pytest.mark.parametrize("placement", [None, "device", "epoch"])
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_captured_curves_match_eager_on_cuda(tmp_path: Path, case: str, placement: str | None,
                                            deterministic_cudnn) -> None:
    """6 epochs on all of digits (1,293 training images per epoch, 144 validation images): per-epoch loss terms,
    validation loss and final weights of the captured run against the eager one, with and without the cache."""
    cache = tmp_path if placement else None
    eager = cuda_run(case, "off", cache, placement or "auto")
    captured = cuda_run(case, "on", cache, placement or "auto")
    assert captured.graphs_status == "captured", captured.graphs_status
    if placement:
        assert captured.teacher_outputs.placement == placement and captured.teacher_outputs.in_graph
    assert captured.captured.optimizer.lrs[0].item() == pytest.approx(captured.history[-1]["lr"], rel=1e-6)
    assert [h["lr"] for h in captured.history] == [h["lr"] for h in eager.history]
    assert_close_curves(curve(captured), curve(eager), CURVE_TOL)
    assert relative_weight_distance(captured, eager) < CURVE_TOL


@needs_cuda
def test_the_curve_tolerance_sees_a_wrong_step(tmp_path: Path, deterministic_cudnn) -> None:
    """Negative control: the teacher rows of other images (a wrong gather) must fall outside CURVE_TOL."""
    right = cuda_run("kd", "off", tmp_path, "device")
    outputs = right.teacher_outputs
    shuffled = torch.randperm(outputs.tensors["logits"].shape[0], device="cuda", generator=None)
    outputs.tensors = {k: t[shuffled] for k, t in outputs.tensors.items()}
    cfg = replace(right.cfg, cuda_graphs="on")
    wrong = make_run(cfg, outputs)
    wrong.run()
    with pytest.raises(AssertionError):
        assert_close_curves(curve(wrong), curve(right), CURVE_TOL)
    teacher_outputs.forget_shared()
