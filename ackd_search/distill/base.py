"""The one interface every distiller implements, so the trainer never asks which method it runs.

`forward_train(x, y, epoch, teacher_out=None)` returns the student's logits, the loss to minimise and named terms to
log. `teacher_out` = (teacher logits, teacher pooled features or None) for the batch, read from the teacher-output cache
(ackd_search/output_cache.py) by the trainer; without it the distiller runs its teacher.

A cached teacher output has the type `TeacherOut` below."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ackd_search.distill.forms import kd_term
from ackd_search.models import StagedNet

TeacherOut = tuple[torch.Tensor, torch.Tensor | None]  # (logits (B, classes), pooled features (B, width) or None)


kd_loss = kd_term  # Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch


class Distiller(nn.Module):
    """A student, an optional frozen teacher, and whatever extra modules the method trains alongside."""

    def __init__(self, student: StagedNet, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        # Methods with an adversary own its optimiser (see ACKD); the trainer checkpoints it when present.
        self.adversary_optimizer: torch.optim.Optimizer | None = None

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen: BN statistics must not move
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the main optimiser: everything but the teacher and the adversary."""
        skip = {id(p) for p in self.adversary_parameters()}
        return (p for name, p in self.named_parameters() if not name.startswith("teacher.") and id(p) not in skip)

    def adversary_parameters(self) -> list[nn.Parameter]:
        return []

    def set_epoch(self, epoch: int) -> None:
        """Fill whatever the step reads per epoch (loss weights) into device tensors, in place; called by the
        trainer before an epoch's first step, outside any captured step."""

    def step_key(self, epoch: int) -> object:
        """What decides the SHAPE of `forward_train` at `epoch` (which parts run): one captured CUDA graph serves
        every epoch with the same key. Nothing data-dependent may change the shape."""
        return None

    def compile_targets(self) -> list[nn.Module]:
        """Modules worth `torch.compile`-ing (compiled in place, so state-dict keys do not change)."""
        return [m for m in (self.student, self.teacher) if m is not None]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None, "this distiller has no teacher"
        return self.teacher(x)

    def forward_train(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def export_student(self) -> dict[str, torch.Tensor]:
        """The deployable student alone (stem, stages, head) as a CPU state dict: whatever the method trained
        alongside it (auxiliary learners, projections, discriminator) is dropped, so it loads with `strict=True`
        into `create_model(student_arch, num_classes, in_channels=...)`."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.student.state_dict().items()}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything that training changes (the teacher is frozen and cached elsewhere)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this distiller: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
