"""The staged-network interface every model implements (zoo or adapted from a library), and the zoo's registry.

A staged net is `stem -> stages[0..K-1] -> head`; distillers attach to stage boundaries by index."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from ackd_search.errors import UnknownModelError


@dataclass(frozen=True)
class StageInfo:
    channels: int  # output channels of the stage
    reduction: int  # spatial stride from the network input to this stage's output


class Head(nn.Module):
    """Global average pool + linear classifier. Adaptive pooling adds no parameters and takes any input size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


class ClassifierHead(nn.Module):
    """A library model's own head: `pre_logits` is everything between the last stage and the final Linear (pooling,
    flatten, norms, hidden layers, dropout), so `pooled(x)` is that Linear's input; `fc` is that Linear itself."""

    def __init__(self, pre_logits: nn.Module, fc: nn.Linear):
        super().__init__()
        self.pre_logits = pre_logits
        self.fc = fc

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


class StagedNet(nn.Module):
    """A classifier cut into a stem, K stages and a head; `stage_info[i]` describes `stages[i]`'s output.

    Nets adapted from timm / torchvision / a user's module also set `original_keys` (their library's state-dict
    names -> this net's names, so checkpoints of the library model load) and, when they could not be cut into
    stages (one stage, no branch points), `staging_problem`: the one-line reason. Zoo nets keep both None."""

    original_keys: dict[str, str] | None = None  # None: the names are this net's own (zoo, a user's StagedNet)
    staging_problem: str | None = None

    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: Head, stage_info: list[StageInfo]):
        super().__init__()
        if len(stages) != len(stage_info):
            raise ValueError(f"{len(stages)} stages but {len(stage_info)} stage_info entries")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_info = list(stage_info)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run `stages[start:stop]` on `x` (the stem's output when `start == 0`)."""
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def benchmark_init(model: nn.Module, classifier: Literal["default", "zero_bias", "normal"] = "default") -> None:
    """The CIFAR KD benchmark's initialisation: He-normal (fan_out) convolutions with zero bias, BatchNorm weight 1
    and bias 0; the classifier per family: torch's default, a zero bias, or N(0, 0.01) weights with a zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and classifier != "default":
            if classifier == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class ModelBuilder(Protocol):
    def __call__(self, num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet: ...


_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(fn: Callable[..., StagedNet], name: str | None = None) -> Callable[..., StagedNet]:
    """Register a builder `fn(num_classes=..., width=1.0, in_channels=3) -> StagedNet` under `name` (default: the
    function's name); usable as a decorator."""
    name = name or fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def is_zoo_model(name: str) -> bool:
    return name in _REGISTRY


def create_zoo_model(name: str, num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """Build a registered zoo model. `width` scales every stage's channels (training-only capacity for learners)."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return _REGISTRY[name](num_classes=num_classes, width=width, in_channels=in_channels)
