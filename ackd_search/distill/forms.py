"""Distillation FORMS: how one distillation term (student logits against a teacher's or a peer's logits) is scored.

A `Form` is a searched choice wherever a method distils from a teacher or a peer:

- ``kd``: Hinton KD (Hinton et al., 2015), T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch;
- ``dkd``: Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"), alpha * TCKD + beta * NCKD,
  each scaled by T^2 and averaged over the batch, with a linear warm-up of the whole term;
- ``standardize`` (a switch on either): logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in
  Knowledge Distillation"), a per-sample z-score of the student's and the teacher's logits before the temperature.

Everything here is pure torch, computed in float32 (inputs are cast, so it runs under `torch.autocast`), and safe to
capture in a CUDA graph: no `.item()`, no host sync, no Python branch on a tensor's value (the only branches are on
the `Form`, i.e. the config). `warmup_factor` is host arithmetic on the epoch; the caller fills it into a device
tensor once per epoch (as ACKD's `set_epoch` does for its ramps), never inside a captured step.

Gradients: nothing is detached here, exactly as `base.kd_loss`. A frozen teacher's logits come without a graph
(`torch.no_grad` or the teacher-output cache); a peer's collaborative target may carry one on purpose (ACKD's
`detach_target=False`, and its attention weights learn through the targets), so detaching is the caller's call.

`target` is always the ground-truth label y: DKD splits the classes into the label and the rest, also when the
"teacher" side is a peer's collaborative target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ackd_search.config import DistillConfig

FormName = Literal["kd", "dkd"]
FORM_NAMES: tuple[str, ...] = ("kd", "dkd")

LS_EPS = 1e-7  # logit standardisation: added to the std (the authors' `normalize`, 1e-7 + stdv)
_TINY_VAR = torch.finfo(torch.float32).tiny  # floor of the variance, only so a constant row has a finite gradient


def standardize(logits: torch.Tensor, eps: float = LS_EPS) -> torch.Tensor:
    """Per-sample z-score of the logits over the class dim, in float32: (z - mean(z)) / (std(z) + eps).

    Sun et al. 2024, Sec. 3 / Algorithm 1 (the Z-score pre-process; their base temperature divides the result
    afterwards, which is our `temperature`). Implementation details follow the authors' code
    (sunshangquan/logit-standardization-KD, `normalize` in mdistiller/distillers/KD.py and DKD.py): the std is
    torch's default UNBIASED one (divisor C - 1) and eps = 1e-7 is added to the std, not to the variance.

    One deviation, invisible in the value: the variance is floored at float32's smallest normal (~1.2e-38) before
    the square root, so an exactly constant row (std 0) gives 0 with a finite gradient instead of a NaN one."""
    z = logits.float()
    centred = z - z.mean(dim=-1, keepdim=True)
    std = z.var(dim=-1, keepdim=True).clamp_min(_TINY_VAR).sqrt()  # var: unbiased (correction=1), as torch.std
    return centred / (std + eps)


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes, mean over the batch.

    Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network"; the T^2 keeps the soft-target
    gradients' scale as T changes). The same operations as `ackd_search.distill.base.kd_loss`, so the same value
    bit for bit."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def dkd_parts(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 * TCKD, T^2 * NCKD), each summed within a sample and averaged over the batch (Zhao et al. 2022).

    With p = softmax(z / T) and t the label (Zhao et al., Sec. 3.1 "Reformulating KD"; equation numbers of the
    arXiv version):
      - binary probabilities b = [p_t, p_\\t], p_\\t = sum_{i != t} p_i (Eq. 1);
      - probabilities among the non-target classes p^_i = exp(z_i / T) / sum_{j != t} exp(z_j / T) (Eq. 2);
      - TCKD = KL(b^T || b^S), NCKD = KL(p^^T || p^^S), so that KD = TCKD + (1 - p_t^T) * NCKD (Eq. 6-7).
    From mdistiller (megvii-research/mdistiller, mdistiller/distillers/DKD.py), which the paper does not spell out:
    BOTH terms are multiplied by T^2, and each is a sum over the batch divided by the batch size (= batchmean).

    Computed in log space: log p_t = z_t/T - lse(z/T), log p_\\t = lse_{j!=t}(z/T) - lse(z/T) and
    log p^_i = z_i/T - lse_{j!=t}(z/T), with the label's entry masked out of the non-target log-sum-exp. mdistiller
    instead takes log of the summed probabilities for TCKD and subtracts 1000 from the label's (tempered) logit
    for NCKD; the values agree (exp(-1000) is 0 in float32) but ours cannot take log(0) when a sample is
    confidently right, and nothing infinite enters a product, so no NaN reaches the gradient."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    classes = torch.arange(s.shape[1], device=s.device)
    gt = classes.unsqueeze(0) == target.reshape(-1, 1)  # (B, C) bool, True at the label: elementwise, no sync
    idx = target.reshape(-1, 1)

    def log_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse_all = torch.logsumexp(z, dim=1, keepdim=True)
        lse_nt = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1, keepdim=True)  # over j != t (C >= 2)
        log_b = torch.cat([z.gather(1, idx) - lse_all, lse_nt - lse_all], dim=1)  # (B, 2): log [p_t, p_\t]
        log_hat = (z - lse_nt).masked_fill(gt, 0.0)  # (B, C): log p^_i, the label's entry set to a finite 0
        return log_b, log_hat

    log_b_s, log_hat_s = log_parts(s)
    log_b_t, log_hat_t = log_parts(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1).mean()
    hat_t = log_hat_t.exp().masked_fill(gt, 0.0)  # the label carries no mass among the non-target classes
    nckd = (hat_t * (log_hat_t - log_hat_s)).sum(dim=1).mean()
    scale = temperature**2
    return tckd * scale, nckd * scale


def dkd_term(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, temperature: float
) -> torch.Tensor:
    """DKD = alpha * TCKD + beta * NCKD (Zhao et al. 2022, Eq. 8), both T^2-scaled and batch-averaged as in
    mdistiller (see `dkd_parts`); without the warm-up (`warmup_factor`)."""
    tckd, nckd = dkd_parts(student, teacher, target, temperature)
    return alpha * tckd + beta * nckd


@dataclass(frozen=True)
class Form:
    """One distillation form. `alpha`, `beta` and `warmup_epochs` are DKD's and ignored by ``kd``.

    Defaults are mdistiller's CIFAR-100 DKD setting (mdistiller/engine/cfg.py: CE_WEIGHT 1, ALPHA 1, BETA 8, T 4,
    WARMUP 20; configs/cifar100/dkd/res32x4_res8x4.yaml overrides none of them). `warmup_epochs` is in recipe
    epochs; the caller passes the budget scale. The temperature is not part of the form: it is the method's."""

    name: FormName = "kd"
    standardize: bool = False
    alpha: float = 1.0
    beta: float = 8.0
    warmup_epochs: float = 20.0

    def __post_init__(self) -> None:
        if self.name not in FORM_NAMES:
            raise ValueError(f"distillation form {self.name!r}: expected one of {FORM_NAMES}")
        for field in ("alpha", "beta", "warmup_epochs"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"distillation form {field}={value!r}: expected a finite number >= 0")

    def weight(self, epoch: int, budget_scale: float = 1.0) -> float:
        """The warm-up factor of this form at 0-based `epoch` (see `warmup_factor`)."""
        return warmup_factor(self, epoch, budget_scale)


def distill_term(
    form: Form, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """One distillation term in `form`: standardise both sides if asked, then kd or dkd (without the warm-up).

    As the logit-standardisation authors do (KD.py / DKD.py of their repository), the z-score is applied to the
    student's and the teacher's logits before the temperature, and the T^2 factor is kept. `target` (the true
    label y) is needed by ``dkd`` only."""
    if form.standardize:
        student, teacher = standardize(student), standardize(teacher)
    if form.name == "dkd":
        if target is None:
            raise ValueError("the dkd form needs the ground-truth labels (target)")
        return dkd_term(student, teacher, target, form.alpha, form.beta, temperature)
    return kd_term(student, teacher, temperature)


def warmup_factor(form: Form, epoch: int, budget_scale: float = 1.0) -> float:
    """The factor on the distillation term at 0-based `epoch`: 1.0 for ``kd``; for ``dkd`` a linear ramp over
    `warmup_epochs * budget_scale` epochs, min((epoch + 1) / (warmup_epochs * budget_scale), 1.0).

    mdistiller multiplies the DKD term by min(epoch / WARMUP, 1.0) with a 1-BASED epoch (its trainer starts at
    epoch = 1), so its first epoch already has weight 1 / WARMUP and the full weight arrives at the WARMUP-th
    epoch; with our 0-based epochs that is (epoch + 1). No epoch has weight 0. A warm-up of 0 means none."""
    if form.name != "dkd":
        return 1.0
    length = form.warmup_epochs * budget_scale
    if length <= 0:
        return 1.0
    return min(max(epoch + 1, 0) / length, 1.0)


def form_of(cfg: DistillConfig) -> Form:
    """The form a distillation config asks for (`distill.form`, `distill.standardize`, `distill.dkd.*`)."""
    return Form(name=cfg.form, standardize=cfg.standardize, alpha=cfg.dkd.alpha, beta=cfg.dkd.beta,
                warmup_epochs=cfg.dkd.warmup_epochs)
