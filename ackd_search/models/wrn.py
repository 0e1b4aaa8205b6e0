"""CIFAR Wide ResNets (pre-activation blocks) as used by the RepDistiller CIFAR-100 benchmark.

Owns wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2; stem = one conv, the final BN+ReLU closes the last stage."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, benchmark_init, register_model


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the shortcut is identity, or a 1x1 conv on the pre-activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(in_channels)
        self.conv_a = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(out_channels)
        self.conv_b = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn_a(x))
        out = self.conv_b(torch.relu(self.bn_b(self.conv_a(act))))
        # The projection reads the activated input, the identity the raw one (as in the reference WRN).
        return out + (x if self.shortcut is None else self.shortcut(act))


def wide_resnet(depth: int, widen: int, num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """WRN-depth-widen for 32x32 inputs: three groups of (depth-4)/6 blocks at 16k, 32k, 64k channels."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    stem_ch = _scaled(16, width)
    stem = nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 1
    for i, base in enumerate((16, 32, 64)):
        ch = _scaled(base * widen, width)
        stride = 1 if i == 0 else 2
        reduction *= stride
        layers: list[nn.Module] = [
            PreActBlock(prev if j == 0 else ch, ch, stride if j == 0 else 1) for j in range(blocks_per_stage)
        ]
        if i == 2:
            layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*layers))
        info.append(StageInfo(ch, reduction))
        prev = ch
    net = StagedNet(stem, stages, Head(prev, num_classes), info)
    benchmark_init(net, classifier="zero_bias")
    return net


# The zoo's wide ResNets: name, depth, widen factor.
for _name, _depth, _widen in (("wrn_16_1", 16, 1), ("wrn_16_2", 16, 2), ("wrn_40_1", 40, 1), ("wrn_40_2", 40, 2)):
    register_model(functools.partial(wide_resnet, _depth, _widen), name=_name)
