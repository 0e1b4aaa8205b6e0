"""The `study:` and `learners:` sections of a space file as typed settings: the study's name, storage, budgets,
sampler and pruner specs, confirmation, heartbeats, and the Ray backend's options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ackd_search.config import bounds


@dataclass
class RayOptions:
    """How a study runs with `--backend ray` (`study.ray` in a space file); the plain backend ignores it."""

    cpus_per_trial: float = field(default=1.0, metadata=bounds(gt=0))
    gpus_per_trial: float | None = field(default=None, metadata=bounds(ge=0))  # None: 1 with GPUs, else 0;
    # 0.25 packs four trials on one GPU (a scheduling unit, not a memory limit)
    max_concurrent: int | None = field(default=None, metadata=bounds(ge=1))  # None: what the cluster holds
    scheduler: Literal["asha", "pruner", "fifo"] | None = None  # None: asha, or fifo when the study cannot prune
    grace_period: int | None = field(default=None, metadata=bounds(ge=1))  # ASHA's first rung (epochs)
    reduction_factor: float | None = field(default=None, metadata=bounds(gt=1))  # ASHA's; None: the pruner's or 4
    max_failures: int | None = field(default=None, metadata=bounds(ge=0))  # Ray retries; None: study.max_retry

    def for_cluster(self, resources: dict[str, float]) -> RayOptions:
        """Fill the defaults that depend on what the cluster holds."""
        gpus = resources.get("GPU", 0)
        per_gpu = self.gpus_per_trial if self.gpus_per_trial is not None else (1 if gpus else 0)
        fits = [resources.get("CPU", 1) / self.cpus_per_trial] + ([gpus / per_gpu] if per_gpu else [])
        concurrent = self.max_concurrent or max(1, int(min(fits)))
        return dataclasses.replace(self, gpus_per_trial=per_gpu, max_concurrent=concurrent)


@dataclass
class ConfirmSettings:
    """The confirmation stage (`study.confirm`): the top-k distinct configurations and the presets, retrained."""

    top_k: int = field(default=3, metadata=bounds(ge=0))
    seeds: int = field(default=3, metadata=bounds(ge=1, le=20))
    epochs: int | None = field(default=None, metadata=bounds(ge=1))  # None: the trial budget
    # The baselines: the student alone, RepDistiller's KD, mdistiller's DKD (the strongest published one of the
    # three) and `reference` (our ACKD reconstruction).
    presets: list[Literal["student", "kd", "dkd", "reference"]] = field(
        default_factory=lambda: ["student", "kd", "dkd", "reference"])


@dataclass
class StudySettings:
    name: str = ""
    storage: str | None = None  # any SQLAlchemy URL; default sqlite:///studies/<name>.db
    n_trials: int | None = None
    timeout_s: float | None = None
    second_objective: Literal["student_flops", "student_params"] | None = None
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    presets: bool = True  # enqueue the reference ACKD (and the KD / DKD points the space holds) before sampling
    final_epochs: int | None = None  # the full budget written by `export` (default: the trial budget)
    heartbeat_interval_s: int = 60
    grace_period_s: int = 180
    max_retry: int = field(default=2, metadata=bounds(ge=0))
    # How long every storage call waits for the database to come back (a restart, a failover, a full disk on
    # its server) before the search stops in one line; its trials' checkpoints wait for the next run.
    storage_outage_s: float = field(default=120.0, metadata=bounds(gt=0))
    artifacts_dir: str | None = None  # default studies/<name>-artifacts
    runs_dir: str | None = None  # default studies/<name>-runs (per-trial checkpoints)
    ray: RayOptions = field(default_factory=RayOptions)
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    # Least share of the trials each method keeps when distill.method is searched; None: 1 / (2 * methods), 0: off
    method_floor: float | None = field(default=None, metadata=bounds(ge=0, lt=1))


@dataclass
class LearnerSpace:
    """Auxiliary-learner structure: a count per branch point (1..K-1) and a cap on the total."""

    stages: list[int] | None = None  # branch points searched; default every boundary 1..K-1
    max_per_stage: int = field(default=3, metadata=bounds(ge=0, le=16))
    max_total: int = field(default=4, metadata=bounds(ge=0, le=32))

