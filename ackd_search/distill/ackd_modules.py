"""ACKD's modules (our reconstruction; see ackd.py): an auxiliary learner branching off the student, the attention
that weighs the peers, and the discriminator of the adversarial collaborative module."""

from __future__ import annotations

import torch
from torch import nn

from ackd_search.models import StagedNet, create_model, fresh_head, fresh_stages, supports_width


class AuxLearner(nn.Module):
    """One auxiliary learner: branches after student stage `placement` (1-based), then its own stages and head."""

    def __init__(self, placement: int, adapter: nn.Module, stages: nn.ModuleList, head: nn.Module):
        super().__init__()
        self.placement = placement
        self.adapter = adapter
        self.stages = stages
        self.head = head

    @property
    def pooled_width(self) -> int:
        return self.head.fc.in_features

    def forward(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and logits from the trunk's feature map at this learner's branch point."""
        x = self.adapter(trunk_features)
        for stage in self.stages:
            x = stage(x)
        pooled = self.head.pooled(x)
        return pooled, self.head.fc(pooled)




def build_aux_learner(student: StagedNet, student_arch: str, placement: int, aux_width: float) -> AuxLearner:
    """A fresh copy of `stages[placement:]` and a new head: for a zoo student, taken from a newly built zoo model of
    width `aux_width` (no per-model code); for a library or user model, re-initialised copies of its own stages and
    head (`aux_width` does not act there and must be 1)."""
    trunk_channels = student.stage_info[placement - 1].channels
    if not supports_width(student_arch):
        if aux_width != 1.0:
            raise ValueError(f"distill.ackd.aux_width: {aux_width} scales zoo students only; {student_arch} keeps its "
                             "own width (allowed: 1.0)")
        return AuxLearner(placement, nn.Identity(), fresh_stages(student, placement), fresh_head(student))
    num_classes = student.head.fc.out_features
    donor = create_model(student_arch, num_classes, width=aux_width)
    branch_channels = donor.stage_info[placement - 1].channels
    adapter: nn.Module = nn.Identity()
    if branch_channels != trunk_channels:  # only when aux_width != 1: the copied stages expect another width
        adapter = nn.Sequential(
            nn.Conv2d(trunk_channels, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
        )
    return AuxLearner(placement, adapter, nn.ModuleList(donor.stages[placement:]), donor.head)


def check_placements(placements: list[int], num_stages: int, student_arch: str) -> None:
    allowed = f"1..{num_stages - 1}" if num_stages > 1 else "none (the model has a single stage)"
    for i, p in enumerate(placements):
        if not 1 <= p < num_stages:
            raise ValueError(
                f"distill.ackd.aux_placements[{i}]: {p} is out of range for {student_arch} "
                f"({num_stages} stages); allowed: {allowed}"
            )


def _width_key(width: int) -> str:
    return f"w{width}"


class CollabAttention(nn.Module):
    """OKDDip-style attention: A_ij = softmax_j(q_i . k_j) per sample, over all learners (student j = 0, self included).

    Bias-free W_q, W_k map pooled features to `dim` dimensions; learners of one pooled width share one pair, so the
    student and width-1 auxiliaries share them (as in OKDDip). `query_rows` lists the learners whose target comes
    from attention (all of them, or only the auxiliaries when the student learns from their mean)."""

    def __init__(self, widths: list[int], query_rows: list[int], dim: int, include_self: bool = True):
        super().__init__()
        self.query_rows = list(query_rows)
        self.include_self = include_self
        query_widths = sorted({widths[i] for i in self.query_rows})
        self.query = nn.ModuleDict({_width_key(w): nn.Linear(w, dim, bias=False) for w in query_widths})
        self.key = nn.ModuleDict({_width_key(w): nn.Linear(w, dim, bias=False) for w in sorted(set(widths))})
        own = torch.zeros(len(self.query_rows), len(widths), dtype=torch.bool)  # A_ii, masked without `include_self`
        own[torch.arange(len(self.query_rows)), torch.tensor(self.query_rows, dtype=torch.long)] = True
        self.register_buffer("own", own, persistent=False)  # built once: no host-to-device copy inside a step

    @staticmethod
    def _project(layers: nn.ModuleDict, pooled: list[torch.Tensor]) -> torch.Tensor:
        widths = {h.shape[1] for h in pooled}
        if len(widths) == 1:  # one matmul for all learners
            return layers[_width_key(widths.pop())](torch.stack(pooled, dim=1))
        return torch.stack([layers[_width_key(h.shape[1])](h) for h in pooled], dim=1)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """A (B, len(query_rows), L): row r holds learner `query_rows[r]`'s weights over all L learners."""
        q = self._project(self.query, [pooled[i] for i in self.query_rows])
        k = self._project(self.key, pooled)
        scores = torch.bmm(q, k.transpose(1, 2)).float()
        if not self.include_self:  # each learner attends to its peers only
            scores = scores.masked_fill(self.own, float("-inf"))
        return torch.softmax(scores, dim=-1)


class Discriminator(nn.Module):
    """MLP in -> 256 -> 128 -> 1 with LeakyReLU(0.2), returning one logit per input row (fp32)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 128),
            nn.LeakyReLU(0.2),
            nn.Linear(128, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.float()).squeeze(-1)


def no_autocast(device: torch.device):
    # D is tiny: run it (and its own backward) in fp32 whatever precision the trainer's autocast asks for.
    return torch.autocast(device_type=device.type, enabled=False)

