"""The two baselines: the student trained alone (cross-entropy) and Hinton KD from a frozen teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ackd_search.distill.base import Distiller, TeacherOut, kd_loss
from ackd_search.models import StagedNet


class StudentOnly(Distiller):
    def __init__(self, student: StagedNet):
        super().__init__(student, teacher=None)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None):
        logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y)
        return logits, ce, {"ce": ce.detach()}


class KD(Distiller):
    def __init__(self, student: StagedNet, teacher: nn.Module, temperature: float, ce_weight: float, kd_weight: float):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None):
        teacher_logits = teacher_out[0] if teacher_out is not None else self.teacher_logits(x)
        logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y)
        kd = kd_loss(logits, teacher_logits, self.temperature)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return logits, loss, {"ce": ce.detach(), "kd": kd.detach()}
