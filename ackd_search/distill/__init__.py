"""Distillers behind one interface: the student alone, KD and ACKD, each distilling in a searched form."""

from __future__ import annotations

from torch import nn

from ackd_search.config import DistillConfig, OptimConfig
from ackd_search.distill.ackd import ACKD
from ackd_search.distill.base import Distiller, kd_loss
from ackd_search.distill.forms import Form, form_of
from ackd_search.distill.kd import KD, StudentOnly
from ackd_search.models import StagedNet

__all__ = ["ACKD", "KD", "Distiller", "Form", "StudentOnly", "build_distiller", "form_of", "kd_loss"]


def build_distiller(
    cfg: DistillConfig, student: StagedNet, teacher: nn.Module | None, optim: OptimConfig, student_arch: str
) -> Distiller:
    if cfg.method == "student":
        return StudentOnly(student)
    if teacher is None:
        raise ValueError(f"distill.method {cfg.method!r} needs a teacher")
    if cfg.method == "kd":
        return KD(student, teacher, cfg.temperature, cfg.ce_weight, cfg.kd_weight, form_of(cfg), optim.budget_scale)
    return ACKD(student, teacher, cfg, optim, student_arch)
