"""The model zoo: the staged-network interface, the registry, and every registered architecture.

Importing this package imports each zoo module, which registers its builders with `register_model`."""

from ackd_search.models import digits, mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (registration)
from ackd_search.models.base import (
    Head,
    StagedNet,
    StageInfo,
    UnknownModelError,
    check_model_name,
    create_model,
    list_models,
    register_model,
)
from ackd_search.models.complexity import count_flops, count_parameters

__all__ = [
    "Head",
    "StageInfo",
    "StagedNet",
    "UnknownModelError",
    "check_model_name",
    "count_flops",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
]
