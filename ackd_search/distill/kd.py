"""The two baselines: the student trained alone (cross-entropy) and KD from a frozen teacher, in any distillation
form (Hinton's KD by default, decoupled KD, either with logit standardisation: `forms.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ackd_search.distill.base import Distiller, TeacherOut
from ackd_search.distill.forms import Form, distill_term
from ackd_search.models import StagedNet


class StudentOnly(Distiller):
    def __init__(self, student: StagedNet):
        super().__init__(student, teacher=None)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None):
        logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y)
        return logits, ce, {"ce": ce.detach()}


class KD(Distiller):
    def __init__(self, student: StagedNet, teacher: nn.Module, temperature: float, ce_weight: float, kd_weight: float,
                 form: Form | None = None, budget_scale: float = 1.0):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.form = form or Form()
        self.budget_scale = budget_scale
        # DKD's warm-up factor of the epoch, on the device (filled by `set_epoch`, read by a captured step).
        self.register_buffer("form_w", torch.ones(()), persistent=False)
        self._weights_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._weights_epoch:
            self.form_w.fill_(self.form.weight(epoch, self.budget_scale))
            self._weights_epoch = epoch

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None):
        self.set_epoch(epoch)
        teacher_logits = teacher_out[0] if teacher_out is not None else self.teacher_logits(x)
        logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y)
        kd = distill_term(self.form, logits, teacher_logits, y, self.temperature)
        weighted = self.form_w * kd if self.form.name == "dkd" else kd  # Hinton KD has no warm-up
        loss = self.ce_weight * ce + self.kd_weight * weighted
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        if self.form.name == "dkd":
            terms["form_w"] = self.form_w
        return logits, loss, terms
