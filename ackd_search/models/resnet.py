"""CIFAR ResNets (post-activation basic blocks) as used by the RepDistiller CIFAR-100 benchmark.

Owns resnet8/14/20/32/44/56/110 (16-16-32-64 filters) and resnet8x4/32x4 (32-64-128-256); stem = conv+BN+ReLU."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, benchmark_init, register_model

_NARROW = (16, 16, 32, 64)  # stem, layer1, layer2, layer3
_WIDE_X4 = (32, 64, 128, 256)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1-conv+BN shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(out_channels)
        self.conv_b = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        return torch.relu(out + self.shortcut(x))


def cifar_resnet(
    depth: int, filters: tuple[int, int, int, int], num_classes: int, width: float = 1.0, in_channels: int = 3
) -> StagedNet:
    """A 6n+2-layer CIFAR ResNet; `filters` = (stem, layer1, layer2, layer3) channels at width 1."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    stem_ch, *stage_ch = (_scaled(c, width) for c in filters)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem_ch),
        nn.ReLU(inplace=True),
    )
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 1
    for i, ch in enumerate(stage_ch):
        stride = 1 if i == 0 else 2
        reduction *= stride
        blocks = [ResidualBlock(prev if j == 0 else ch, ch, stride if j == 0 else 1) for j in range(blocks_per_stage)]
        stages.append(nn.Sequential(*blocks))
        info.append(StageInfo(ch, reduction))
        prev = ch
    net = StagedNet(stem, stages, Head(prev, num_classes), info)
    benchmark_init(net)
    return net


# The zoo's CIFAR ResNets: name, depth, filters.
for _name, _depth, _filters in (("resnet8", 8, _NARROW), ("resnet14", 14, _NARROW), ("resnet20", 20, _NARROW),
                                ("resnet32", 32, _NARROW), ("resnet44", 44, _NARROW), ("resnet56", 56, _NARROW),
                                ("resnet110", 110, _NARROW), ("resnet8x4", 8, _WIDE_X4), ("resnet32x4", 32, _WIDE_X4)):
    register_model(functools.partial(cifar_resnet, _depth, _filters), name=_name)
