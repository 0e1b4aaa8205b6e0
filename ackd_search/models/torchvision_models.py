"""`torchvision:<name>` classification models: built by torchvision.models.get_model and cut into stages by each
family's own stage modules; the name check, and the first-conv swap for inputs without 3 channels."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ackd_search.errors import ModelError, one_line
from ackd_search.models.base import StagedNet
from ackd_search.models.staging import (
    Layout,
    LayoutFn,
    Piece,
    group_by_resolution,
    piece_shapes,
    stage_model,
)

PREFIX = "torchvision:"
_PROBE_SIZES = (64, 224)  # 64 is cheap; ViT, Inception and the like only run at their own 224 (or 299 for v3)
_FLATTEN: Piece = ("flatten", nn.Flatten(1))  # torchvision flattens with torch.flatten inside forward()


def classification_models() -> list[str]:
    # module=torchvision.models lists the classification models only (not detection, video, quantized, ...).
    return torchvision.models.list_models(module=torchvision.models)


def torchvision_name_problem(name: str) -> str | None:
    if not name:
        return "torchvision models are named torchvision:<name>, e.g. torchvision:resnet18"
    names = classification_models()
    if name in names:
        return None
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else "see torchvision.models.list_models()"
    return f"unknown torchvision classification model {PREFIX + name!r}; {hint}"


def _children(module: nn.Module, prefix: str) -> list[Piece]:
    return [(prefix + name, child) for name, child in module.named_children()]


def _pool() -> Piece:
    # Stands in for a functional global average pool in forward() (mobilenet_v2, mnasnet, shufflenet, densenet).
    return ("pool", nn.AdaptiveAvgPool2d(1))


def _fold_stem(groups: list[list[Piece]], x: torch.Tensor) -> tuple[list[Piece], list[list[Piece]]]:
    """The first group is the stem when it is the stride-2 stem conv alone at reduction <= 2 (as for timm)."""
    first = groups[0]
    if len(groups) > 1 and x.shape[-2] / piece_shapes(first, x)[-1][-2] <= 2:
        return first, groups[1:]
    return [], groups


def _resnet(model: nn.Module, x: torch.Tensor) -> Layout:
    stem = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
    stages = [[(n, getattr(model, n))] for n in ("layer1", "layer2", "layer3", "layer4")]
    return Layout(stem, stages, [("avgpool", model.avgpool), _FLATTEN])


def _regnet(model: nn.Module, x: torch.Tensor) -> Layout:
    stages = [[piece] for piece in _children(model.trunk_output, "trunk_output.")]
    return Layout([("stem", model.stem)], stages, [("avgpool", model.avgpool), _FLATTEN])


def _shufflenet(model: nn.Module, x: torch.Tensor) -> Layout:
    stem = [("conv1", model.conv1), ("maxpool", model.maxpool)]
    stages = [[(n, getattr(model, n))] for n in ("stage2", "stage3", "stage4")]
    return Layout(stem, stages, [("conv5", model.conv5), _pool(), _FLATTEN])


def _convnext(model: nn.Module, x: torch.Tensor) -> Layout:
    features = _children(model.features, "features.")
    stem_out = features[0][1](x)
    stages = group_by_resolution(features[1:], stem_out)  # each downsampling layer opens the next stage
    return Layout(features[:1], stages, [("avgpool", model.avgpool), *_children(model.classifier, "classifier.")])


def _densenet(model: nn.Module, x: torch.Tensor) -> Layout:
    # Stages end at each dense block (as timm's feature_info); the transition that halves the map opens the next.
    features = _children(model.features, "features.")
    stem, rest, stages = features[:4], features[4:], []
    for piece in rest:
        if not stages or piece[0].rpartition(".")[2].startswith("transition"):
            stages.append([])
        stages[-1].append(piece)
    return Layout(stem, stages, [("relu", nn.ReLU()), _pool(), _FLATTEN, ("classifier", model.classifier)])


def _inverted_residuals(features: str, head_convs: int, pool: Callable[[nn.Module], Piece]) -> LayoutFn:
    """MobileNet v2/v3, EfficientNet, MNASNet: `features` split where the resolution changes; the last
    `head_convs` pieces (the 1x1 conv to the head width) belong to the head, as timm's conv_head does."""

    def layout(model: nn.Module, x: torch.Tensor) -> Layout:
        pieces = _children(getattr(model, features), features + ".")
        body, head = pieces[:-head_convs], pieces[-head_convs:]
        stem, stages = _fold_stem(group_by_resolution(body, x), x)
        classifier = _children(model.classifier, "classifier.")
        return Layout(stem, stages, [*head, pool(model), _FLATTEN, *classifier])

    return layout


def _plain_convnet(model: nn.Module, x: torch.Tensor) -> Layout:
    """VGG and AlexNet: a stage ends at each max-pool."""
    stages: list[list[Piece]] = [[]]
    for piece in _children(model.features, "features."):
        stages[-1].append(piece)
        if isinstance(piece[1], nn.MaxPool2d):
            stages.append([])
    stages = [stage for stage in stages if stage]
    if len(stages) > 1 and not isinstance(stages[-1][-1][1], nn.MaxPool2d):
        stages[-2] += stages.pop()  # convs after the last pool belong to the last stage
    stem, stages = _fold_stem(stages, x)
    return Layout(stem, stages, [("avgpool", model.avgpool), _FLATTEN, *_children(model.classifier, "classifier.")])


def _avgpool(model: nn.Module) -> Piece:
    return ("avgpool", model.avgpool)


_FAMILIES: list[tuple[tuple[str, ...], LayoutFn]] = [
    (("resnet", "resnext", "wide_resnet"), _resnet),
    (("regnet_",), _regnet),
    (("shufflenet_v2",), _shufflenet),
    (("convnext_",), _convnext),
    (("densenet",), _densenet),
    (("mobilenet_v2",), _inverted_residuals("features", 1, lambda m: _pool())),
    (("mobilenet_v3", "efficientnet_"), _inverted_residuals("features", 1, _avgpool)),
    (("mnasnet",), _inverted_residuals("layers", 3, lambda m: _pool())),
    (("vgg", "alexnet"), _plain_convnet),
]


def family_layout(name: str) -> LayoutFn | None:
    return next((fn for prefixes, fn in _FAMILIES if name.startswith(prefixes)), None)


def adapt_input_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel conv for one taking `in_channels` (torchvision models are fixed to RGB). Its weight
    is the old one adapted as timm does for `in_chans`: summed over RGB for 1 channel, else RGB repeated and
    rescaled, so pretrained filters keep their response and a random init keeps the library's scale."""
    path, conv = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
                      (None, None))
    if conv is None or path is None:
        raise ModelError(f"has no 3-channel input convolution to adapt to {in_channels} channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        weight = conv.weight
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            repeats = -(-in_channels // 3)
            new.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _library_kwargs(name: str) -> dict:
    # GoogLeNet / Inception v3 return (logits, aux logits) in training unless told not to: KD needs one tensor.
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def build_torchvision(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> StagedNet:
    """torchvision's model `name`, staged by its family and verified; other families become one stage. With
    `pretrained`, torchvision downloads weights="DEFAULT" and the head keeps their classes (see `replace_head`).
    For `in_channels != 3` the first conv is swapped (see `adapt_input_conv`); its original key names stay."""
    label = PREFIX + name
    try:
        if pretrained:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_library_kwargs(name))
    except Exception as err:  # urllib / hash / kwargs errors: one line for the user
        if pretrained:
            raise ModelError(f"{label}: cannot fetch its pretrained weights ({one_line(err)}); give a checkpoint "
                             "file of its weights instead") from None
        raise ModelError(f"{label}: torchvision cannot build it ({one_line(err)})") from None
    if in_channels != 3:
        try:
            adapt_input_conv(model, in_channels)
        except ModelError as err:
            raise ModelError(f"{label} {err}") from None
    layout = family_layout(name)
    families = ", ".join(prefix.rstrip("_") for prefixes, _ in _FAMILIES for prefix in prefixes)
    reason = None if layout else f"no stage layout is known for its family (staged: {families})"
    return stage_model(label, model, layout, in_channels, _PROBE_SIZES, unstaged_reason=reason)
