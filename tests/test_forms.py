"""Distillation forms (ackd_search/distill/forms.py): kd, dkd and logit standardisation against values worked out by
hand in plain Python from the papers' formulas, kd against the package's `kd_loss`, DKD's decomposition of KD,
standardisation's invariance, gradients, the warm-up, autocast, and (with CUDA) a captured graph without host syncs."""

from __future__ import annotations

import math

import pytest
import torch

from ackd_search.distill.forms import (
    Form,
    distill_term,
    dkd_parts,
    dkd_term,
    kd_term,
    standardize,
    warmup_factor,
)

try:
    from ackd_search.distill.base import kd_loss
except ImportError:  # the package is being restructured: the public name stays
    from ackd_search.distill import kd_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# batch 2 x 3 classes, labels 0 and 2
STUDENT = [[1.0, 0.5, -0.5], [0.2, -1.0, 2.0]]
TEACHER = [[2.0, 0.0, -1.0], [-0.5, 0.3, 1.5]]
LABELS = [0, 2]


# --- plain-Python references, written from the formulas ------------------------------------------------------------
def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_kd(student, teacher, temperature) -> float:
    """Hinton: T^2 * mean over samples of KL(softmax(t/T) || softmax(s/T))."""
    per_sample = [kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(student, teacher)]
    return temperature**2 * sum(per_sample) / len(per_sample)


def hand_tckd_nckd(s_row, t_row, label, temperature) -> tuple[float, float]:
    """Zhao et al.: b = [p_t, 1 - p_t]; p^_i = p_i / (1 - p_t), i != t; TCKD = KL(b^T||b^S), NCKD = KL(p^^T||p^^S)."""
    ps, pt = softmax(s_row, temperature), softmax(t_row, temperature)
    b_s, b_t = [ps[label], 1 - ps[label]], [pt[label], 1 - pt[label]]
    hat_s = [p / (1 - ps[label]) for i, p in enumerate(ps) if i != label]
    hat_t = [p / (1 - pt[label]) for i, p in enumerate(pt) if i != label]
    return kl(b_t, b_s), kl(hat_t, hat_s)


def hand_dkd(student, teacher, labels, alpha, beta, temperature) -> float:
    per_sample = []
    for s, t, y in zip(student, teacher, labels):
        tckd, nckd = hand_tckd_nckd(s, t, y, temperature)
        per_sample.append(alpha * tckd + beta * nckd)
    return temperature**2 * sum(per_sample) / len(per_sample)


def hand_standardize(row: list[float], eps: float = 1e-7) -> list[float]:
    """z-score with the UNBIASED std (divisor n - 1), eps added to the std."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (std + eps) for v in row]


def tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


# --- values against hand computation -------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_term_hand_value(temperature):
    s, t, _ = tensors()
    assert kd_term(s, t, temperature).item() == pytest.approx(hand_kd(STUDENT, TEACHER, temperature), rel=1e-5)


@pytest.mark.parametrize("temperature,alpha,beta", [(1.0, 1.0, 1.0), (4.0, 1.0, 8.0), (2.0, 0.5, 3.0)])
def test_dkd_term_hand_value(temperature, alpha, beta):
    s, t, y = tensors()
    expected = hand_dkd(STUDENT, TEACHER, LABELS, alpha, beta, temperature)
    assert dkd_term(s, t, y, alpha, beta, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_parts_hand_values():
    s, t, y = tensors()
    tckd, nckd = dkd_parts(s, t, y, 4.0)
    parts = [hand_tckd_nckd(a, b, c, 4.0) for a, b, c in zip(STUDENT, TEACHER, LABELS)]
    assert tckd.item() == pytest.approx(16.0 * sum(p[0] for p in parts) / 2, rel=1e-5)  # both parts carry T^2
    assert nckd.item() == pytest.approx(16.0 * sum(p[1] for p in parts) / 2, rel=1e-5)


def test_standardize_hand_values_unbiased_std():
    z = standardize(torch.tensor([[1.0, 2.0, 3.0], [4.0, -2.0, 0.5]]))
    assert z.dtype == torch.float32
    # mean 2, unbiased std 1: [-1, 0, 1] (the population std would give +-1.2247)
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(z[1], torch.tensor(hand_standardize([4.0, -2.0, 0.5])), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardized_forms_hand_values(name):
    s, t, y = tensors()
    zs, zt = [hand_standardize(r) for r in STUDENT], [hand_standardize(r) for r in TEACHER]
    form = Form(name=name, standardize=True, alpha=1.0, beta=8.0)
    expected = hand_kd(zs, zt, 2.0) if name == "kd" else hand_dkd(zs, zt, LABELS, 1.0, 8.0, 2.0)
    assert distill_term(form, s, t, y, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_unstandardized_forms_are_kd_and_dkd_terms():
    s, t, y = tensors()
    assert torch.equal(distill_term(Form(), s, t, y, 4.0), kd_term(s, t, 4.0))
    assert torch.equal(distill_term(Form(), s, t, None, 4.0), kd_term(s, t, 4.0))  # kd needs no labels
    dkd = Form(name="dkd", alpha=2.0, beta=5.0)
    assert torch.equal(distill_term(dkd, s, t, y, 4.0), dkd_term(s, t, y, 2.0, 5.0, 4.0))


# --- kd equals the package's kd_loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 3.0, 4.0])
def test_kd_term_equals_kd_loss(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    torch.testing.assert_close(kd_term(s, t, temperature), kd_loss(s, t, temperature), rtol=0, atol=0)


# --- DKD's decomposition of KD and mdistiller's implementation -----------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_weighted_nckd(temperature):
    """Zhao et al.: KD = TCKD + (1 - p_t^T) * NCKD per sample (every term carries the same T^2)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 7, generator=g) * 2, torch.randn(8, 7, generator=g) * 2
    y = torch.randint(0, 7, (8,), generator=g)
    for i in range(8):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_parts(si, ti, yi, temperature)
        p_target = torch.softmax(ti / temperature, dim=1)[0, yi[0]]
        torch.testing.assert_close(kd_term(si, ti, temperature), tckd + (1 - p_target) * nckd, rtol=1e-5, atol=1e-6)
        # alpha = beta = 1 lifts the (1 - p_t) on NCKD: DKD >= KD
        assert dkd_term(si, ti, yi, 1.0, 1.0, temperature) >= kd_term(si, ti, temperature) - 1e-6


def mdistiller_style_dkd(s, t, y, alpha, beta, temperature):
    """Zhao et al.'s released recipe, re-derived: log of summed probabilities for TCKD, -1000 on the label's tempered
    logit for NCKD, sums over the batch divided by its size, both terms times T^2."""
    gt = torch.nn.functional.one_hot(y, s.shape[1]).float()
    ps, pt = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() / s.shape[0]
    log_hat_s = torch.log_softmax(s / temperature - 1000.0 * gt, 1)
    hat_t = torch.softmax(t / temperature - 1000.0 * gt, 1)
    nckd = torch.special.xlogy(hat_t, hat_t).sum() / s.shape[0] - (hat_t * log_hat_s).sum() / s.shape[0]
    return (alpha * tckd + beta * nckd) * temperature**2


def test_dkd_matches_mdistiller_recipe():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(32, 100, generator=g) * 4, torch.randn(32, 100, generator=g) * 4
    y = torch.randint(0, 100, (32,), generator=g)
    torch.testing.assert_close(
        dkd_term(s, t, y, 1.0, 8.0, 4.0), mdistiller_style_dkd(s, t, y, 1.0, 8.0, 4.0), rtol=1e-5, atol=1e-5
    )


def test_dkd_identical_distributions_is_zero():
    s, _, y = tensors()
    tckd, nckd = dkd_parts(s, s.clone(), y, 4.0)
    assert abs(tckd.item()) < 1e-6 and abs(nckd.item()) < 1e-6


# --- standardisation's invariance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardization_invariant_to_shift_and_scale(name):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    scale = torch.rand(6, 1, generator=g) * 5 + 0.2  # per sample, positive
    shift = torch.randn(6, 1, generator=g) * 10
    form = Form(name=name, standardize=True)
    base = distill_term(form, s, t, y, 2.0)
    torch.testing.assert_close(distill_term(form, s * scale + shift, t, y, 2.0), base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(distill_term(form, s, t * scale + shift, y, 2.0), base, rtol=1e-4, atol=1e-5)
    plain = Form(name=name)  # without it, scaling a side changes the loss
    assert not torch.allclose(distill_term(plain, s * 3, t, y, 2.0), distill_term(plain, s, t, y, 2.0))


def test_standardize_constant_row_is_finite():
    z = torch.zeros(2, 5, requires_grad=True)
    out = standardize(z)
    out.pow(2).sum().backward()
    assert torch.equal(out, torch.zeros(2, 5)) and torch.isfinite(z.grad).all()


# --- gradients ----------------------------------------------------------------------------------------------------
FORMS = [Form(), Form(name="dkd"), Form(standardize=True), Form(name="dkd", standardize=True)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.name}-ls{int(f.standardize)}")
def test_gradients_reach_the_student_not_a_frozen_teacher(form):
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(4, 10, generator=g) * 3).requires_grad_()
    with torch.no_grad():  # a frozen teacher's (or cached) logits come without a graph
        t = torch.randn(4, 10, generator=g) * 3
    y = torch.randint(0, 10, (4,), generator=g)
    distill_term(form, s, t, y, 4.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not t.requires_grad and t.grad is None


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.name}-ls{int(f.standardize)}")
def test_teacher_side_is_not_detached(form):
    """A peer's collaborative target may carry a graph (ACKD): the term does not cut it, as kd_loss does not."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 10, generator=g).requires_grad_()
    t = torch.randn(4, 10, generator=g).requires_grad_()
    distill_term(form, s, t, torch.randint(0, 10, (4,), generator=g), 4.0).backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_dkd_confident_extremes_stay_finite():
    """A sample confidently right or wrong by ~100 logits at T = 1: no log(0), no inf * 0 in the gradient."""
    s = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 100.0]], requires_grad=True)
    t = torch.tensor([[120.0, 0.0, -5.0], [0.0, 90.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = dkd_term(s, t, y, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_dkd_gradient_matches_mdistiller_recipe():
    g = torch.Generator().manual_seed(6)
    s1 = (torch.randn(8, 12, generator=g) * 2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    t = torch.randn(8, 12, generator=g) * 2
    y = torch.randint(0, 12, (8,), generator=g)
    dkd_term(s1, t, y, 1.0, 8.0, 4.0).backward()
    mdistiller_style_dkd(s2, t, y, 1.0, 8.0, 4.0).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


# --- the warm-up --------------------------------------------------------------------------------------------------
def test_warmup_factor_values():
    kd, dkd = Form(), Form(name="dkd")  # warm-up 20 recipe epochs
    assert [warmup_factor(kd, e, s) for e, s in [(0, 1.0), (5, 0.25), (300, 1.0)]] == [1.0, 1.0, 1.0]
    # 0-based epochs: epoch 0 is mdistiller's epoch 1, weight 1/20; full weight at the 20th epoch (index 19)
    assert warmup_factor(dkd, 0) == pytest.approx(1 / 20)
    assert warmup_factor(dkd, 9) == pytest.approx(0.5)
    assert warmup_factor(dkd, 18) == pytest.approx(19 / 20)
    assert warmup_factor(dkd, 19) == 1.0 and warmup_factor(dkd, 239) == 1.0
    # a quarter of the budget: 5 warm-up epochs
    assert [warmup_factor(dkd, e, 0.25) for e in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert warmup_factor(Form(name="dkd", warmup_epochs=0.0), 0) == 1.0
    assert dkd.weight(3, 0.5) == warmup_factor(dkd, 3, 0.5) == pytest.approx(0.4)
    assert isinstance(dkd.weight(0), float)


def test_form_defaults_and_validation():
    f = Form()
    assert (f.name, f.standardize, f.alpha, f.beta, f.warmup_epochs) == ("kd", False, 1.0, 8.0, 20.0)
    with pytest.raises(ValueError, match="form"):
        Form(name="nkd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        Form(name="dkd", beta=-1.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        Form(name="dkd", warmup_epochs=float("nan"))
    s, t, _ = tensors()
    with pytest.raises(ValueError, match="labels"):
        distill_term(Form(name="dkd"), s, t, None, 4.0)
    assert hash(Form(name="dkd", standardize=True)) == hash(Form(name="dkd", standardize=True))  # frozen


# --- autocast and CUDA graphs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.name}-ls{int(f.standardize)}")
def test_autocast_computes_in_float32(form):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(4, 10, generator=g).bfloat16(), torch.randn(4, 10, generator=g).bfloat16()
    y = torch.randint(0, 10, (4,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distill_term(form, s, t, y, 4.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, distill_term(form, s.float(), t.float(), y, 4.0), rtol=1e-6, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.name}-ls{int(f.standardize)}")
def test_cuda_graph_capture_without_sync(form):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(16, 100, generator=g) * 3).to(dev).requires_grad_()
    t = (torch.randn(16, 100, generator=g) * 3).to(dev)
    y = torch.randint(0, 100, (16,), generator=g).to(dev)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the term raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = distill_term(form, s, t, y, 4.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            s.grad = None
            distill_term(form, s, t, y, 4.0).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    s.grad = None
    with torch.cuda.graph(graph):
        static = distill_term(form, s, t, y, 4.0)
        static.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(s.grad).all()
