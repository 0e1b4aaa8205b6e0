"""Models: the staged-network interface, the CIFAR zoo and its registry, and adapters that stage timm, torchvision
and user-built modules (`create_model` takes any of their names); checkpoint files and learner parts.

Importing this package imports each zoo module, which registers its builders with `register_model`."""

from ackd_search.errors import ModelError, UnknownModelError, WeightsError
from ackd_search.models import digits, mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (registration)
from ackd_search.models.base import (
    ClassifierHead,
    Head,
    StagedNet,
    StageInfo,
    is_zoo_model,
    list_models,
    register_model,
)
from ackd_search.models.complexity import count_flops, count_parameters
from ackd_search.models.init import initial_model
from ackd_search.models.learners import fresh_head, fresh_stages, replace_head
from ackd_search.models.names import (
    PREFIXES,
    built_elsewhere,
    check_model_name,
    create_model,
    model_name_problem,
    staging_problem,
    supports_width,
)
from ackd_search.models.user_models import register_builder
from ackd_search.models.weights import (
    checkpoint_classes,
    head_mismatch,
    load_failure,
    load_original_state_dict,
    original_state_dict,
    read_state_dict,
)

__all__ = [
    "PREFIXES",
    "ClassifierHead",
    "Head",
    "ModelError",
    "StageInfo",
    "StagedNet",
    "UnknownModelError",
    "WeightsError",
    "built_elsewhere",
    "check_model_name",
    "count_flops",
    "count_parameters",
    "create_model",
    "fresh_head",
    "fresh_stages",
    "checkpoint_classes",
    "head_mismatch",
    "is_zoo_model",
    "initial_model",
    "list_models",
    "load_failure",
    "load_original_state_dict",
    "model_name_problem",
    "original_state_dict",
    "read_state_dict",
    "register_builder",
    "register_model",
    "replace_head",
    "staging_problem",
    "supports_width",
]
