"""CIFAR MobileNetV2 at width multiplier 0.5 (RepDistiller's `mobile_half`), registered as `mobilenetv2`.

Owns the inverted-residual net: stride-2 stem conv, four stages cut where resolution halves, 1x1 conv ends stage 3."""

from __future__ import annotations

import torch
from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, benchmark_init, register_model

_MULTIPLIER = 0.5  # mobile_half
_LAST_CHANNELS = 1280  # the benchmark shrinks the final 1x1 conv only for multipliers above 1, so x0.5 keeps 1280
_EXPANSION = 6
# (expansion, channels at multiplier 1, repeats, first stride) per inverted-residual group; the first group does
# not expand, but the benchmark still gives it a 1x1 "expansion" conv, which we keep for parameter parity.
_GROUPS = (
    (1, 16, 1, 1),
    (_EXPANSION, 24, 2, 1),
    (_EXPANSION, 32, 3, 2),
    (_EXPANSION, 64, 4, 2),
    (_EXPANSION, 96, 3, 1),
    (_EXPANSION, 160, 3, 2),
    (_EXPANSION, 320, 1, 1),
)
# Which groups form each stage: boundaries sit at the benchmark's feature taps (after groups 1, 2, 4, 6).
_STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor`, never below `divisor` nor more than 10% under `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shape is preserved."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            _conv_bn_relu(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


@register_model
def mobilenetv2(num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """MobileNetV2 x0.5 for 32x32 inputs; `width` rescales every layer on top of the 0.5 multiplier.

    At width 1 the channels are the benchmark's int(c * 0.5) (all multiples of 4, so make_divisible(., 4) keeps
    them); its last 1x1 conv stays at 1280 because the benchmark only shrinks it for multipliers above 1, and
    `width` then scales that 1280 like every other layer."""

    def scaled(base: int) -> int:
        return make_divisible(int(base * _MULTIPLIER) * width, 4)

    last_ch = make_divisible(_LAST_CHANNELS * width, 8)

    stem_ch = scaled(32)
    stem = _conv_bn_relu(in_channels, stem_ch, 3, stride=2)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 2
    for k, group_ids in enumerate(_STAGE_GROUPS):
        blocks: list[nn.Module] = []
        for g in group_ids:
            expansion, base, repeats, stride = _GROUPS[g]
            ch = scaled(base)
            for r in range(repeats):
                blocks.append(InvertedResidual(prev, ch, stride if r == 0 else 1, expansion))
                prev = ch
            reduction *= stride
        if k == len(_STAGE_GROUPS) - 1:
            blocks.append(_conv_bn_relu(prev, last_ch, 1))
            prev = last_ch
        stages.append(nn.Sequential(*blocks))
        info.append(StageInfo(prev, reduction))
    net = StagedNet(stem, stages, Head(prev, num_classes), info)
    benchmark_init(net, classifier="normal")
    return net
