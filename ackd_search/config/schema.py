"""The typed run configuration: data, models, optimiser, teacher, distiller, with every field's default and range.

The defaults of `AckdConfig` are the `reference` configuration (our reconstruction); presets are built here."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ackd_search.config.convert import bounded
from ackd_search.models import model_name_problem

# A model name: the zoo's, `timm:<name>`, `torchvision:<name>` or `py:<file.py>:<function>` (models/names.py).
MODEL_FIELD = {"check_fn": model_name_problem}


@dataclass
class DataConfig:
    """Which data a run reads (ackd_search/data): a built-in set, `imagefolder`, `arrays` or `torchvision:<Class>`."""

    name: Literal["digits", "cifar10", "cifar100", "imagefolder", "arrays", "torchvision:MNIST",
                  "torchvision:FashionMNIST", "torchvision:KMNIST", "torchvision:USPS", "torchvision:SVHN",
                  "torchvision:STL10", "torchvision:CIFAR10", "torchvision:CIFAR100"] = "digits"
    # digits / cifar*: the files' folder; imagefolder: ROOT of ROOT/train/<class>/<image> (+ ROOT/val, ROOT/test);
    # arrays: an .npz or a folder of .npy files (x_train, y_train, x_val, ...); torchvision:*: the class's root.
    data_root: str = "data"
    val_fraction: float = bounded(gt=0.0, le=0.5, default=0.1)
    split_seed: int = 0  # fixed so every trial of a search shares one validation set
    download: bool = True
    limit: int | None = bounded(ge=10, default=None)  # cap on train+val images, for smoke runs
    # imagefolder: resize the shorter side to N and centre-crop N x N (None: keep, when every image has one size).
    image_size: int | None = bounded(ge=8, le=4096, default=None)
    # imagefolder: auto = 1 channel when every image is grey, else RGB.
    channels: Literal["auto", "rgb", "grey"] = "auto"
    mean: list[float] | None = None  # per channel, in [0, 1] units; None: computed on the training split
    std: list[float] | None = None
    num_classes: int | None = bounded(ge=2, le=1_000_000, default=None)  # arrays: None = the largest label + 1
    # auto: the data set's standard one, else by resolution (pad-crop + flip below 64 px, resized crop + flip above).
    augment: Literal["auto", "none", "crop", "crop_flip", "resized_crop", "resized_crop_flip"] = "auto"
    cache_dir: str = "studies/decoded"  # imagefolder: the decoded uint8 arrays, shared by every trial and worker


@dataclass
class OptimConfig:
    """SGD with the benchmark's step schedule; milestones are in recipe epochs, scaled to `epochs`."""

    epochs: int = bounded(ge=1, le=10_000, default=240)
    batch_size: int = bounded(ge=1, le=65_536, default=64)
    lr: float = bounded(gt=0.0, le=10.0, default=0.05)
    momentum: float = bounded(ge=0.0, lt=1.0, default=0.9)
    weight_decay: float = bounded(ge=0.0, le=0.1, default=5e-4)
    schedule: Literal["step", "cosine"] = "step"
    recipe_epochs: int = bounded(ge=1, default=240)
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = bounded(gt=0.0, le=1.0, default=0.1)

    @property
    def budget_scale(self) -> float:
        """Factor that maps recipe epochs (240-epoch benchmark) to this run's budget."""
        return self.epochs / self.recipe_epochs

    def scaled_milestones(self) -> list[int]:
        """Repeats are kept: when a short budget puts two decays on one epoch, MultiStepLR applies both there."""
        return sorted(max(1, round(m * self.budget_scale)) for m in self.milestones if m < self.recipe_epochs)


@dataclass
class TeacherConfig:
    arch: str = field(default="digits_cnn_large", metadata=MODEL_FIELD)
    # The user's own teacher weights: a state dict file (.pt / .pth read with weights_only=True, or .safetensors),
    # in the library's key names or ours; used as it is, or fine-tuned first with `finetune`.
    checkpoint: str | None = None
    pretrained: bool = False  # the library's own weights (timm / torchvision download them; needs a network)
    # Fine-tune the checkpoint or the pretrained weights on this data once (a head of other classes is replaced
    # by a fresh one), cached like a trained teacher: {epochs, lr, ...} as `optim`. None: use them as they are.
    finetune: OptimConfig | None = None
    seed: int = 0
    cache_dir: str = "studies/teachers"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=30))
    # The teacher's logits for every augmented view of every training image, computed once per (teacher, data,
    # augmentation) beside the cached teacher and read by every trial instead of running the teacher
    # (ackd_search/training/output_cache.py). auto: on when its arrays fit half of this machine's memory
    # (output_cache.HOST_MEMORY_FRACTION) and, on a CPU, costs no more teacher forwards than the run itself would;
    # on: always (unless the augmentation cannot be enumerated).
    output_cache: Literal["auto", "on", "off"] = "auto"


@dataclass
class AckdConfig:
    """ACKD knobs. The defaults are the `reference` configuration: OUR RECONSTRUCTION, not the paper's.

    Keep the reference values here and nowhere else (see ../shared/ackd-method.md)."""

    aux_placements: list[int] | None = None  # None = reference: three learners before the last stage
    aux_width: float = bounded(gt=0.0, le=4.0, default=1.0)
    aggregation: Literal["attention", "mean"] = "attention"
    attn_reduction: int = bounded(ge=1, le=64, default=8)
    # False masks A_ii: with the targets' logits detached but the weights trained, the attention can learn to point
    # each learner at itself (measured on digits: A_ii ~0.9 after 20 epochs), which empties the collaborative term.
    attn_self: bool = True
    detach_target: bool = True
    student_target: Literal["attention", "aux_mean"] = "aux_mean"
    collab_weight: float = bounded(ge=0.0, le=100.0, default=1.0)
    collab_rampup_epochs: float = bounded(ge=0.0, default=80.0)  # recipe epochs, scaled to the budget
    adv_weight: float = bounded(ge=0.0, le=100.0, default=0.1)
    adv_warmup_epochs: float = bounded(ge=0.0, default=0.0)  # recipe epochs, scaled to the budget
    adv_real: Literal["teacher", "ensemble"] = "teacher"
    adv_input: Literal["probs", "features"] = "probs"
    d_lr: float = bounded(gt=0.0, le=1.0, default=2e-4)
    aux_weight: float = bounded(ge=0.0, le=100.0, default=1.0)

    def resolved_placements(self, num_stages: int) -> list[int]:
        if self.aux_placements is None:
            return [num_stages - 1] * 3
        return list(self.aux_placements)


# Loss weights a method uses unless the config sets them: ACKD's reference point (our reconstruction) and
# RepDistiller's KD weighting. Keep them here and nowhere else.
METHOD_WEIGHTS = {"ackd": (1.0, 1.0), "kd": (0.1, 0.9), "student": (1.0, 0.0)}


@dataclass
class DkdConfig:
    """Decoupled KD's knobs (distill.form: dkd); defaults are mdistiller's CIFAR-100 setting (alpha 1, beta 8,
    a 20-epoch warm-up), the warm-up in recipe epochs, scaled to the budget like the milestones."""

    alpha: float = bounded(ge=0.0, le=100.0, default=1.0)  # weight of the target-class term (TCKD)
    beta: float = bounded(ge=0.0, le=100.0, default=8.0)  # weight of the non-target-class term (NCKD)
    warmup_epochs: float = bounded(ge=0.0, default=20.0)


@dataclass
class DistillConfig:
    method: Literal["student", "kd", "ackd"] = "ackd"
    temperature: float = bounded(gt=0.0, le=100.0, default=4.0)
    ce_weight: float | None = bounded(ge=0.0, le=100.0, default=None)  # None: the method's own (METHOD_WEIGHTS)
    kd_weight: float | None = bounded(ge=0.0, le=100.0, default=None)
    # How every distillation term is scored, from the teacher and (ACKD) from the peers: Hinton KD or decoupled KD
    # (ackd_search/distill/forms.py); `standardize` z-scores both sides' logits first (logit standardisation).
    form: Literal["kd", "dkd"] = "kd"
    standardize: bool = False
    dkd: DkdConfig = field(default_factory=DkdConfig)
    ackd: AckdConfig = field(default_factory=AckdConfig)

    def __post_init__(self) -> None:
        ce, kd = METHOD_WEIGHTS.get(self.method, (1.0, 1.0))
        self.ce_weight = ce if self.ce_weight is None else self.ce_weight
        self.kd_weight = kd if self.kd_weight is None else self.kd_weight


@dataclass
class RunConfig:
    seed: int = 0
    student: str = field(default="digits_cnn_small", metadata=MODEL_FIELD)
    # The student's initial weights: a state dict file (a head of other classes is replaced by a fresh one), or
    # the library's pretrained weights (`student_pretrained`); None and false: trained from scratch.
    student_init: str | None = None
    student_pretrained: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=20))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    channels_last: bool = True  # applied on CUDA only
    compile: bool = False
    # Capture the training step as one CUDA graph and replay it (auto: on for CUDA, off elsewhere). A capture that
    # fails says why in one line and the run continues eagerly; `on` without CUDA says so and runs eagerly.
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    # torch threads on a CPU device (None: torch's default, one per core). On a quiet 2-core machine one thread ran
    # a digits trial as fast as two (ACKD 5.9 s vs 6.2 s, KD 2.2 s vs 2.5 s, means of 3); with other work on the
    # second core, two threads slowed down several-fold. Set 1 for tiny nets and for several workers per machine.
    cpu_threads: int | None = bounded(ge=1, le=1024, default=None)
    eval_test: bool = False  # read the test set once at the end (final training only; the search never does)
    output_dir: str | None = None  # checkpoints and results; None = nothing written


# Every file-system path in a run config: resolved against the driver's folder before a run goes to another process.
PATH_FIELDS = ("output_dir", "data.data_root", "data.cache_dir", "teacher.cache_dir", "teacher.checkpoint",
               "student_init")


# Hand-set points: ACKD's is our reconstruction, KD's RepDistiller's KD weighting, DKD's mdistiller's setting.
def reference_distill() -> DistillConfig:
    return DistillConfig(method="ackd", temperature=4.0, ackd=AckdConfig())


def kd_distill() -> DistillConfig:
    return DistillConfig(method="kd", temperature=4.0)


def dkd_distill() -> DistillConfig:
    """mdistiller's DKD for resnet32x4 -> resnet8x4 on CIFAR-100: CE weight 1, alpha 1, beta 8, T 4, warm-up 20."""
    return DistillConfig(method="kd", form="dkd", temperature=4.0, ce_weight=1.0, kd_weight=1.0, dkd=DkdConfig())



def with_absolute_paths(data: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """A run config's plain data with every PATH_FIELDS entry resolved against `root`: the same run, wherever it
    was started from (the plain backend keeps relative paths, the Ray backend resolves them on its driver)."""
    out = copy.deepcopy(data)
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        owner = out
        for key in parents:
            owner = owner.get(key) or {}
        if owner.get(leaf) is not None:
            owner[leaf] = os.path.abspath(os.path.join(root, owner[leaf]))
    return out

