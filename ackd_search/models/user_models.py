"""`py:<file.py>:<function>` models: the user's own builder loaded from a file; a StagedNet it returns is used as
is, any other nn.Module is staged like a library model (its children in order, split where the resolution changes)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ackd_search.errors import ModelError, UnknownModelError, one_line
from ackd_search.models.base import StagedNet
from ackd_search.models.staging import (
    Layout,
    StagingProblem,
    group_by_resolution,
    piece_shapes,
    stage_model,
)

PREFIX = "py:"
_PROBE_SIZES = (64, 32, 28, 8, 224)  # a user's net may hard-code its input size (a Linear on flattened maps)
_FORM = "py: models are named py:<file.py>:<function>, e.g. py:models/mine.py:build"
_LOADED: dict[tuple[str, int, int], ModuleType] = {}  # (path, mtime, size) -> module: each file runs once


def _split(name: str) -> tuple[Path, str]:
    # rpartition: the function is after the LAST colon, so a path may hold colons of its own.
    file, _, function = name.rpartition(":")
    if not file or not function:
        raise UnknownModelError(_FORM)
    return Path(file), function


def _load_module(path: Path) -> ModuleType:
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key in _LOADED:
        return _LOADED[key]
    module_name = "ackd_user_model_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise UnknownModelError(f"{PREFIX}{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report its own error in one line
        sys.modules.pop(module_name, None)
        raise UnknownModelError(f"{PREFIX}{path}: importing it raised {one_line(err)}") from None
    _LOADED[key] = module
    return module


def load_builder(name: str) -> Callable[..., nn.Module]:
    """The function named by `name` (without the `py:` prefix); UnknownModelError in one line if it is not there."""
    path, function = _split(name)
    if not path.exists():
        raise UnknownModelError(f"{PREFIX}{name}: file not found: {path}")
    if not path.is_file():
        raise UnknownModelError(f"{PREFIX}{name}: {path} is not a file")
    module = _load_module(path)
    if not hasattr(module, function):
        defined = sorted(n for n, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_"))
        listing = f"; it defines: {', '.join(defined)}" if defined else "; it defines no functions"
        raise UnknownModelError(f"{PREFIX}{name}: {path} has no function {function!r}{listing}")
    builder = getattr(module, function)
    if not callable(builder):
        raise UnknownModelError(f"{PREFIX}{name}: {function!r} in {path} is a {type(builder).__name__}, not callable")
    return builder


def user_name_problem(name: str) -> str | None:
    try:
        load_builder(name)
    except UnknownModelError as err:
        return str(err)
    return None


def children_layout(model: nn.Module, x: torch.Tensor) -> Layout:
    """The model's children run in order (true of an nn.Sequential; the equivalence check tests it for others):
    the body ends at the last piece that still outputs a spatial map, and splits where the resolution changes."""
    pieces = list(model.named_children())
    shapes = piece_shapes(pieces, x)
    spatial = [i for i, shape in enumerate(shapes) if len(shape) == 4 and shape[-1] * shape[-2] > 1]
    if not spatial:
        raise StagingProblem("none of its children outputs a spatial feature map")
    body_end = spatial[-1] + 1
    return Layout([], group_by_resolution(pieces[:body_end], x), pieces[body_end:])


def _call(builder: Callable[..., nn.Module], label: str, num_classes: int, in_channels: int) -> object:
    signature = inspect.signature(builder)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    kwargs: dict[str, int] = {"num_classes": num_classes}
    if "in_channels" in signature.parameters or takes_any:
        kwargs["in_channels"] = in_channels
    elif in_channels != 3:
        raise ModelError(f"{label}: the data has {in_channels} channels but the builder takes no in_channels")
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise ModelError(f"{label}: the builder must take num_classes (and may take in_channels): {err}") from None
    try:
        return builder(**kwargs)
    except Exception as err:  # the user's code: its own error, in one line
        raise ModelError(f"{label}: the builder raised {one_line(err)}") from None


def build_user(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> StagedNet:
    """Call the user's builder as `fn(num_classes=..., in_channels=...)` (in_channels only if it takes it)."""
    label = PREFIX + name
    if pretrained:
        raise ModelError(f"{label}: py: builders have no library weights to download; load them in the builder "
                         "or give a checkpoint file")
    return _staged(label, load_builder(name), num_classes, in_channels)


# Builders handed to the Python API (`ackd_search.searching(student=fn)`): known in this process only.
PYTHON_PREFIX = "python:"
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str, builder: Callable[..., nn.Module]) -> str:
    """Make `builder(num_classes=..., [in_channels=...])` buildable as `python:<name>` in this process."""
    if not callable(builder):
        raise ModelError(f"{PYTHON_PREFIX}{name}: a builder must be callable, got {type(builder).__name__}")
    _REGISTERED[name] = builder
    return PYTHON_PREFIX + name


def registered_problem(name: str) -> str | None:
    if name in _REGISTERED:
        return None
    return (f"{PYTHON_PREFIX}{name} is a builder handed to the Python API in the process that made the study; "
            "this process cannot rebuild it: give it as py:<file.py>:<function> to use it from the command line")


def build_registered(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> StagedNet:
    problem = registered_problem(name)
    if problem or pretrained:
        raise UnknownModelError(problem or f"{PYTHON_PREFIX}{name}: load pretrained weights in the builder")
    return _staged(PYTHON_PREFIX + name, _REGISTERED[name], num_classes, in_channels)


def _staged(label: str, builder: Callable[..., nn.Module], num_classes: int, in_channels: int) -> StagedNet:
    model = _call(builder, label, num_classes, in_channels)
    if isinstance(model, StagedNet):
        fc = getattr(model.head, "fc", None)
        if not hasattr(model.head, "pooled") or not isinstance(fc, nn.Linear):
            raise ModelError(f"{label}: its StagedNet head needs pooled(x) and an nn.Linear `fc`")
        net = model
    elif isinstance(model, nn.Module):
        net = stage_model(label, model, children_layout, in_channels, _PROBE_SIZES)
    else:
        raise ModelError(f"{label}: the builder returned a {type(model).__name__}, not an nn.Module")
    if net.head.fc.out_features != num_classes:
        raise ModelError(f"{label}: it has {net.head.fc.out_features} outputs for {num_classes} classes")
    return net
