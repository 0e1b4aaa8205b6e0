"""Model names: `create_model` dispatches zoo names, `timm:<name>`, `torchvision:<name>` and
`py:<file.py>:<function>`; `model_name_problem` says in one line what is wrong with a name."""

from __future__ import annotations

from functools import lru_cache

from ackd_search.errors import ModelError, UnknownModelError
from ackd_search.models import timm_models, torchvision_models, user_models
from ackd_search.models.base import StagedNet, create_zoo_model, is_zoo_model, list_models

PREFIXES = (timm_models.PREFIX, torchvision_models.PREFIX, user_models.PREFIX, user_models.PYTHON_PREFIX)
_BUILDERS = {
    timm_models.PREFIX: timm_models.build_timm,
    torchvision_models.PREFIX: torchvision_models.build_torchvision,
    user_models.PREFIX: user_models.build_user,
    user_models.PYTHON_PREFIX: user_models.build_registered,
}
_NAME_PROBLEMS = {
    timm_models.PREFIX: timm_models.timm_name_problem,
    torchvision_models.PREFIX: torchvision_models.torchvision_name_problem,
    user_models.PREFIX: user_models.user_name_problem,
    user_models.PYTHON_PREFIX: user_models.registered_problem,
}


def _split(name: str) -> tuple[str | None, str]:
    """(prefix, rest) for a foreign name, (None, name) for a zoo name."""
    prefix = next((p for p in PREFIXES if name.startswith(p)), None)
    return (prefix, name[len(prefix):]) if prefix else (None, name)


def model_name_problem(name: object) -> str | None:
    """None for a valid model name, else one line: close matches for timm / torchvision, the missing file or
    function for py:, the zoo and the prefixes for anything else. Only imports a py: file; builds nothing."""
    if not isinstance(name, str):
        return f"a model name is a string, got {type(name).__name__} {name!r}"
    prefix, rest = _split(name)
    if prefix is not None:
        return _NAME_PROBLEMS[prefix](rest)
    if is_zoo_model(name):
        return None
    # A library name without its prefix (`resnet18`) is the likeliest slip: name the prefixed forms that exist.
    known = [p + name for p in (torchvision_models.PREFIX, timm_models.PREFIX) if _NAME_PROBLEMS[p](name) is None]
    hint = f"did you mean {' or '.join(known)}? " if known else ""
    return (f"unknown model {name!r}; {hint}allowed: {', '.join(list_models())}, or timm:<name>, "
            "torchvision:<name>, py:<file.py>:<function>")


def built_elsewhere(name: object) -> bool:
    """A `python:<name>` builder that the Python API registered in another process (unknown in this one)."""
    return (isinstance(name, str) and name.startswith(user_models.PYTHON_PREFIX)
            and user_models.registered_problem(name[len(user_models.PYTHON_PREFIX):]) is not None)


def check_model_name(name: str) -> None:
    problem = model_name_problem(name)
    if problem is not None:
        raise UnknownModelError(problem)


def supports_width(name: str) -> bool:
    """Whether `width` (ACKD's `aux_width`) acts on the model: zoo models only; a library model has one width."""
    return is_zoo_model(name)


def create_model(name: str, num_classes: int, width: float = 1.0, in_channels: int = 3,
                 pretrained: bool = False) -> StagedNet:
    """Build the model `name` as a StagedNet in train mode. Zoo names are built exactly as before (same init, same
    RNG draws). A foreign model is staged and checked against its own forward here (two or three eval forwards
    of one 64x64 probe image, drawn from a private generator); with `pretrained` the library downloads its
    weights and the head keeps their classes (`replace_head` gives a fresh one for fine-tuning)."""
    check_model_name(name)
    prefix, rest = _split(name)
    if prefix is None:
        if pretrained:
            raise ModelError(f"{name}: zoo models have no pretrained weights; give a checkpoint file instead")
        return create_zoo_model(name, num_classes, width=width, in_channels=in_channels)
    if width != 1.0:
        raise ModelError(f"{name}: width {width} only scales zoo models; a {prefix[:-1]} model keeps its own width")
    return _BUILDERS[prefix](rest, num_classes, in_channels=in_channels, pretrained=pretrained)


@lru_cache(maxsize=64)
def staging_problem(name: str, in_channels: int = 3) -> str | None:
    """Why `name` cannot carry auxiliary learners (one stage only), or None. Builds a foreign model once (cached)."""
    if is_zoo_model(name):
        return None
    return create_model(name, 10, in_channels=in_channels).staging_problem
