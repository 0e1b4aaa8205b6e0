"""`timm:<name>` models: built by timm.create_model and cut into stages at the model's own `feature_info` levels;
also the name check, with close matches over timm.list_models()."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from ackd_search.errors import ModelError, one_line
from ackd_search.models.base import StagedNet, StageInfo
from ackd_search.models.staging import Layout, Piece, StagingProblem, stage_model

PREFIX = "timm:"
_PROBE_SIZE = 64  # every level up to reduction 32 is still 2x2 or larger, and the probe stays cheap on a CPU


def timm_name_problem(name: str) -> str | None:
    """A one-line problem with the timm model `name` (no prefix; a `.tag` naming pretrained weights is allowed)."""
    arch = name.split(".", 1)[0]
    if not arch:
        return "timm models are named timm:<name>, e.g. timm:resnet18"
    if timm.is_model(arch):
        return None
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else "see timm.list_models()"
    return f"unknown timm model {PREFIX + name!r}; {hint}"


def _chain(module: nn.Module, levels: list[str], prefix: str = "") -> list[Piece]:
    """The model's children in order, opening an nn.Sequential wherever a feature level lies inside it (timm's
    `blocks.3`, `stages.1`). Only Sequentials are opened: any other container's forward may not be a chain."""
    pieces: list[Piece] = []
    for child_name, child in module.named_children():
        path = prefix + child_name
        if isinstance(child, nn.Sequential) and any(level.startswith(path + ".") for level in levels):
            pieces += _chain(child, levels, path + ".")
        else:
            pieces.append((path, child))
    return pieces


def timm_layout(model: nn.Module, x: torch.Tensor) -> Layout:
    """Stages end at the `feature_info` modules. A first level at reduction <= 2 is the stem's output (resnet's
    act1, mobilenetv3's bn1, regnet's stem), so it closes the stem instead of making a one-conv stage."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise StagingProblem("it lists no feature_info")
    levels = [(str(level["module"]), int(level["num_chs"]), int(level["reduction"])) for level in info]
    chain = _chain(model, [name for name, _, _ in levels])
    index = {name: i for i, (name, _) in enumerate(chain)}
    inside = [name for name, _, _ in levels if name not in index]
    if inside:
        raise StagingProblem(f"feature level {inside[0]!r} lies inside a block, not between pieces of the model")
    ends = [index[name] for name, _, _ in levels]
    if ends != sorted(set(ends)):
        raise StagingProblem("its feature levels are not in forward order")
    stem: list[Piece] = []
    if len(levels) > 1 and levels[0][2] <= 2:
        stem, levels, ends = chain[: ends[0] + 1], levels[1:], ends[1:]
    start, stages = len(stem), []
    for end in ends:
        stages.append(chain[start : end + 1])
        start = end + 1
    return Layout(stem, stages, chain[start:], [StageInfo(chs, red) for _, chs, red in levels])


def build_timm(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> StagedNet:
    """timm's model `name` with `in_chans=in_channels`, staged and verified. With `pretrained`, timm downloads its
    weights and the head keeps the weights' classes (use `replace_head` to fine-tune on other classes)."""
    label = PREFIX + name
    try:
        if pretrained:
            model = timm.create_model(name, pretrained=True, in_chans=in_channels)
        else:
            model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels)
    except Exception as err:  # timm raises many types (hub, network, unsupported kwargs): one line for the user
        if pretrained:
            raise ModelError(f"{label}: cannot fetch its pretrained weights ({one_line(err)}); give a checkpoint "
                             "file of its weights instead") from None
        raise ModelError(f"{label}: timm cannot build it ({one_line(err)})") from None
    default_size = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    sizes = [_PROBE_SIZE] + ([default_size] if default_size != _PROBE_SIZE else [])
    return stage_model(label, model, timm_layout, in_channels, sizes)
