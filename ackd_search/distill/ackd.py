"""ACKD: a student with auxiliary learners, collaboration by attention and a discriminator (adversarial learning).

Source: "Improved Knowledge Distillation via Adversarial Collaboration" (Liu, Huang, Liu; arXiv 2111.14356). Only the
abstract is public and there is no code, so only the STRUCTURE is the paper's: (1) the student is built with several
auxiliary learners, (2) an adversarial collaborative module (ACM) uses attention and adversarial learning, (3) the
teacher's knowledge is kept whole (offline KD from a frozen teacher to every learner).

EVERYTHING BELOW THAT STRUCTURE IS OUR RECONSTRUCTION (see ../../../shared/ackd-method.md), made configurable so the
search can explore it:
- learners as branches with fresh copies of the later stages + a head (ONE / OKDDip); a 1x1 conv + BN adapter when
  `aux_width` changes the copied stages' input width;
- OKDDip-style attention over learners (bias-free W_q, W_k per pooled width; self included unless `attn_self: false`,
  our knob against the attention collapsing onto each learner itself; `aux_mean` = OKDDip's
  "leader" target, so the student then needs no query projection);
- `detach_target`: we detach the peers' LOGITS inside a target and feed the attention DETACHED pooled features, so
  W_q, W_k still learn through the collaborative terms (detaching the whole target would leave them without any
  gradient, frozen at their random initialisation) while no learner is moved through the attention weights: a
  learner's collaborative term pulls only on its own logits, never on its peers' features (without this, the
  auxiliaries' terms moved the student's last stage too). OKDDip detaches nothing (`detach_target: false`);
- the discriminator (an AMLN / AFD-style MLP with its own Adam), which real/fake sources it sees, and the choice of
  `real` for `adv_real: ensemble` (the mean over learners of the softened collaborative targets);
- `adv_input: features`: one linear connector per learner maps its pooled features to the real source's width (the
  teacher's pooled width, or the student's for `ensemble`). The connectors belong to the LEARNERS (trained by the
  main optimiser through the adversarial term, like a FitNets regressor): if D owned them, it could separate real
  from fake by source alone (e.g. a large bias on the teacher's connector) and the learners would get no signal;
- all weights and schedules (sigmoid collaborative ramp as OKDDip, step warm-up for the adversarial term).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ackd_search.config import DistillConfig, OptimConfig
from ackd_search.distill.ackd_modules import (
    CollabAttention,
    Discriminator,
    build_aux_learner,
    check_placements,
    no_autocast,
)
from ackd_search.distill.base import Distiller, TeacherOut
from ackd_search.distill.forms import distill_term, form_of
from ackd_search.models import StagedNet


class ACKD(Distiller):
    """Student + auxiliary learners + attention collaboration + discriminator; only the student is exported.

    Learner 0 is the student, learners 1..L-1 the auxiliaries in `aux_placements` order (terms `aux{i}/...`)."""

    def __init__(
        self, student: StagedNet, teacher: nn.Module, cfg: DistillConfig, optim: OptimConfig, student_arch: str
    ):
        super().__init__(student, teacher)
        self.cfg, self.ackd = cfg, cfg.ackd
        self.temperature = cfg.temperature
        self.form = form_of(cfg)  # how every distillation term is scored (teacher -> learner, target -> learner)
        self.budget_scale = optim.budget_scale
        placements = self.ackd.resolved_placements(student.num_stages)
        check_placements(placements, student.num_stages, student_arch)
        self.learners = nn.ModuleList(
            build_aux_learner(student, student_arch, p, self.ackd.aux_width) for p in placements
        )
        self.branch_points = sorted(set(placements))
        self.attention = self._attention(student)
        self.connectors, self.discriminator = self._adversary(student, teacher)
        if self.discriminator is not None:
            self.adversary_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=self.ackd.d_lr, betas=(0.5, 0.999)
            )
        # The epoch's loss weights live on the device and are filled in place once per epoch (`set_epoch`), so a
        # captured training step reads the current values instead of the ones it was captured with.
        self.register_buffer("collab_w", torch.zeros(()), persistent=False)
        self.register_buffer("adv_w", torch.zeros(()), persistent=False)
        self.register_buffer("zero_w", torch.zeros(()), persistent=False)
        self.register_buffer("form_w", torch.ones(()), persistent=False)  # DKD's warm-up of the teacher term
        self._weights_epoch: int | None = None

    @property
    def num_aux(self) -> int:
        return len(self.learners)

    def pooled_widths(self) -> list[int]:
        """Pooled feature width of every learner, student first."""
        return [self.student.head.fc.in_features] + [learner.pooled_width for learner in self.learners]

    def _attention(self, student: StagedNet) -> CollabAttention | None:
        if self.num_aux == 0 or self.ackd.aggregation != "attention":
            return None
        dim = max(1, student.head.fc.in_features // self.ackd.attn_reduction)  # C / attn_reduction
        first_row = 1 if self.ackd.student_target == "aux_mean" else 0
        return CollabAttention(self.pooled_widths(), list(range(first_row, self.num_aux + 1)), dim,
                               include_self=self.ackd.attn_self)

    def _adversary(self, student: StagedNet, teacher: nn.Module) -> tuple[nn.ModuleList | None, Discriminator | None]:
        """(feature connectors or None, D or None)."""
        if self.ackd.adv_weight == 0 or (self.ackd.adv_real == "ensemble" and self.num_aux == 0):
            return None, None  # the ensemble real needs a collaborative target, which needs auxiliaries
        if self.ackd.adv_input == "probs":
            return None, Discriminator(student.head.fc.out_features)
        if self.ackd.adv_real == "teacher":
            if not isinstance(teacher, StagedNet):
                raise ValueError("distill.ackd.adv_input: 'features' needs a staged teacher (stem, stages, head)")
            common = teacher.head.fc.in_features
        else:
            common = student.head.fc.in_features
        connectors = nn.ModuleList(nn.Linear(w, common) for w in self.pooled_widths())
        return connectors, Discriminator(common)

    def adversary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def compile_targets(self) -> list[nn.Module]:
        # ACKD runs the student's stem and stages one by one (to branch), so those are the units worth compiling.
        student_parts = [self.student.stem, *self.student.stages]
        return [*student_parts, *([self.teacher] if self.teacher is not None else []), *self.learners]

    # --- schedules (epochs are 0-based; ramp lengths are recipe epochs scaled to the budget) -------------------
    def collab_weight(self, epoch: int) -> float:
        """OKDDip's sigmoid ramp exp(-5 (1 - t)^2), t = epoch / scaled ramp length, clipped to [0, 1]."""
        rampup = self.ackd.collab_rampup_epochs * self.budget_scale
        if rampup <= 0:
            return self.ackd.collab_weight
        t = min(max(epoch / rampup, 0.0), 1.0)
        return self.ackd.collab_weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def adv_weight(self, epoch: int) -> float:
        return self.ackd.adv_weight if epoch >= self.ackd.adv_warmup_epochs * self.budget_scale else 0.0

    def adv_active(self, epoch: int) -> bool:
        """Whether this epoch's step has the adversarial part (D's step and the generator terms)."""
        return self.discriminator is not None and self.adv_weight(epoch) > 0

    def step_key(self, epoch: int) -> bool:
        return self.adv_active(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Fill the device weights for `epoch` in place (a no-op when they already hold it)."""
        if epoch == self._weights_epoch:
            return
        self.collab_w.fill_(self.collab_weight(epoch) if self.num_aux > 0 else 0.0)
        self.adv_w.fill_(self.adv_weight(epoch) if self.discriminator is not None else 0.0)
        self.form_w.fill_(self.form.weight(epoch, self.budget_scale))
        self._weights_epoch = epoch

    # --- forward pieces ----------------------------------------------------------------------------------------
    def _teacher_outputs(self, x: torch.Tensor, need_features: bool, cached: TeacherOut | None = None):
        """Teacher logits (and pooled features when asked): read from `cached` (the teacher-output cache) when it
        holds what is needed, else one teacher forward, without gradients."""
        if cached is not None and (not need_features or cached[1] is not None):
            return cached[0], cached[1] if need_features else None
        if not need_features:
            return self.teacher_logits(x), None
        with torch.no_grad():
            pooled = self.teacher.head.pooled(self.teacher.forward_features(x))
            return self.teacher.head.fc(pooled), pooled

    def _learner_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pooled features and logits of every learner (student first); the shared trunk runs once."""
        student = self.student
        features = student.stem(x)
        at_branch: dict[int, torch.Tensor] = {}
        for index, stage in enumerate(student.stages):
            features = stage(features)
            if index + 1 in self.branch_points:
                at_branch[index + 1] = features
        pooled = [student.head.pooled(features)]
        logits = [student.head.fc(pooled[0])]
        for learner in self.learners:
            h, z = learner(at_branch[learner.placement])
            pooled.append(h)
            logits.append(z)
        return pooled, logits

    def collaborative_targets(self, pooled: list[torch.Tensor], logits: list[torch.Tensor]) -> torch.Tensor:
        """t (B, L, classes): the collaborative target of every learner (needs at least one auxiliary)."""
        stacked = torch.stack(logits, dim=1).float()  # (B, L, classes)
        peers = stacked.detach() if self.ackd.detach_target else stacked
        first_row = 1 if self.ackd.student_target == "aux_mean" else 0
        if self.attention is not None:
            # Detached features: W_q, W_k learn from the collaborative terms, the learners are not moved through them.
            features = [h.detach() for h in pooled] if self.ackd.detach_target else pooled
            rows = torch.bmm(self.attention(features), peers)
        else:  # plain mean of the OTHER learners
            rows = ((peers.sum(dim=1, keepdim=True) - peers) / (peers.shape[1] - 1))[:, first_row:]
        if first_row == 1:  # the student learns from the auxiliaries' mean (OKDDip's leader)
            rows = torch.cat([peers[:, 1:].mean(dim=1, keepdim=True), rows], dim=1)
        return rows

    # --- adversarial learning ----------------------------------------------------------------------------------
    def adversarial_inputs(
        self,
        logits: list[torch.Tensor],
        pooled: list[torch.Tensor],
        teacher_logits: torch.Tensor,
        teacher_pooled: torch.Tensor | None,
        targets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(real, fakes) in D's input space; fakes keep their graph (the learners' step needs it)."""
        if self.ackd.adv_input == "features":
            fakes = [connector(h.float()) for connector, h in zip(self.connectors, pooled)]
            real = teacher_pooled if self.ackd.adv_real == "teacher" else torch.stack(fakes).mean(0)
            return real.detach(), fakes
        fakes = [self._soften(z) for z in logits]
        if self.ackd.adv_real == "teacher":
            return self._soften(teacher_logits), fakes
        return self._soften(targets.detach()).mean(dim=1), fakes  # ensemble: mean over learners of softened t_i

    def discriminator_step(self, real: torch.Tensor, fakes: list[torch.Tensor]) -> torch.Tensor:
        """One Adam step of D on L_D = BCE(D(real), 1) + mean_i BCE(D(fake_i.detach()), 0); touches only D."""
        d = self.discriminator
        with no_autocast(real.device), torch.enable_grad():
            real_logits = d(real.detach())
            fake_logits = d(torch.stack([f.detach() for f in fakes]))  # (L, B)
            loss_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            loss_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            loss = loss_real + loss_fake  # every fake has the same batch size: the mean over all = mean over i
            self.adversary_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.adversary_optimizer.step()
        return loss.detach()

    def generator_losses(self, fakes: list[torch.Tensor]) -> torch.Tensor:
        """Non-saturating generator loss per learner, (L,): BCE(D(fake_i), 1) with the current D.

        D's parameters are frozen while the graph is built, so the learners' backward leaves no gradient in D."""
        d = self.discriminator
        d.requires_grad_(False)
        try:
            with no_autocast(fakes[0].device):
                logits = d(torch.stack(fakes))
                per_sample = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
        finally:
            d.requires_grad_(True)
        return per_sample.mean(dim=1)

    def _soften(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    # --- the training step -------------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int, teacher_out: TeacherOut | None = None):
        """Student logits, L = L_0 + aux_weight * sum_i L_i, and every term by name (see `_learner_loss`).

        In training mode with the adversarial term on, this also takes D's optimiser step (D first, then the
        learners' loss against the updated D)."""
        ackd = self.ackd
        self.set_epoch(epoch)
        # Which parts run depends on the epoch and the config only, never on data: a captured step keeps its shape.
        adv_on = self.training and self.adv_active(epoch)
        collab_w, adv_w = self.collab_w, (self.adv_w if adv_on else self.zero_w)
        need_teacher_features = adv_on and ackd.adv_input == "features" and ackd.adv_real == "teacher"
        teacher_logits, teacher_pooled = self._teacher_outputs(x, need_teacher_features, teacher_out)
        pooled, logits = self._learner_outputs(x)
        targets = self.collaborative_targets(pooled, logits) if self.num_aux > 0 else None

        terms: dict[str, torch.Tensor] = {}
        adv_g = None
        if adv_on:
            real, fakes = self.adversarial_inputs(logits, pooled, teacher_logits, teacher_pooled, targets)
            terms["adv_d"] = self.discriminator_step(real, fakes)
            adv_g = self.generator_losses(fakes)  # with the UPDATED discriminator

        weights = (collab_w, adv_w)
        loss = self._learner_loss(0, logits[0], y, teacher_logits, targets, adv_g, weights, terms)
        if self.num_aux > 0 and ackd.aux_weight > 0:
            aux_losses = [
                self._learner_loss(i, logits[i], y, teacher_logits, targets, adv_g, weights, terms)
                for i in range(1, self.num_aux + 1)
            ]
            loss = loss + ackd.aux_weight * torch.stack(aux_losses).sum()
        terms["collab_w"], terms["adv_w"] = collab_w, adv_w
        if self.form.name == "dkd":
            terms["form_w"] = self.form_w
        return logits[0], loss, terms

    def _learner_loss(self, i, z, y, teacher_logits, targets, adv_g, weights, terms) -> torch.Tensor:
        """L_i of learner i (student i = 0), logging `ce`, `kd`, `collab`, `adv_g` (prefixed `aux{i}/` for i >= 1).

        CE + KD are written exactly as KD's, so that without learners, collaboration and adversary the loss is KD's
        bit for bit; a term whose weight is 0 is logged (when it exists) but not added."""
        collab_w, adv_w = weights
        prefix = f"aux{i}/" if i > 0 else ""
        ce = F.cross_entropy(z.float(), y)
        kd = distill_term(self.form, z, teacher_logits, y, self.temperature)
        # DKD's warm-up scales the teacher's term only: the collaborative term has its own ramp.
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * (self.form_w * kd if self.form.name == "dkd" else kd)
        terms[prefix + "ce"], terms[prefix + "kd"] = ce.detach(), kd.detach()
        if targets is not None:
            collab = distill_term(self.form, z, targets[:, i], y, self.temperature)
            if self.ackd.collab_weight > 0:  # the ramp is positive at every epoch: this is the config's weight
                loss = loss + collab_w * collab
            terms[prefix + "collab"] = collab.detach()
        if adv_g is not None:
            loss = loss + adv_w * adv_g[i]
            terms[prefix + "adv_g"] = adv_g[i].detach()
        return loss
