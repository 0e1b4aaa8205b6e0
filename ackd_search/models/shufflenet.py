"""CIFAR ShuffleNetV1 (g=3) and ShuffleNetV2 (1x), as used by the RepDistiller CIFAR-100 benchmark.

Owns `shufflenetv1` and `shufflenetv2`: 1x1-conv stem, stages = the three stride-2 groups (V2's 1x1 conv ends the
last)."""

from __future__ import annotations

import torch
from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, register_model


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, round(value / multiple) * multiple)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across `groups` so the next grouped conv mixes information between groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stem(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------------------------------- ShuffleNetV1

_V1_GROUPS = 3
_V1_STEM = 24
_V1_STAGES = ((240, 4), (480, 8), (960, 4))  # (output channels, units); each stage opens with a stride-2 unit


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 - shuffle - 3x3 depthwise - grouped 1x1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, in_channels: int, branch_channels: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid = branch_channels // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(torch.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        merged = out + x if self.pool is None else torch.cat([out, self.pool(x)], dim=1)
        return torch.relu(merged)


@register_model
def shufflenetv1(num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """ShuffleNetV1 (g=3, 240-480-960) for 32x32 inputs, default PyTorch init as in the benchmark.

    Channels are rounded to multiples of 4*g so every unit's bottleneck (branch/4) splits evenly into g groups;
    the very first unit's 1x1 conv is ungrouped because the stem's channels need not divide by g."""
    quantum = 4 * _V1_GROUPS
    stem_ch = _round_to(_V1_STEM * width, quantum, quantum)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 1
    for k, (base, units) in enumerate(_V1_STAGES):
        # The stride-2 unit concatenates its input, so its branch only adds the missing channels.
        out_ch = max(_round_to(base * width, quantum, quantum), prev + quantum)
        blocks: list[nn.Module] = []
        for u in range(units):
            opening = u == 0
            blocks.append(
                ShuffleUnitV1(
                    prev,
                    out_ch - prev if opening else out_ch,
                    stride=2 if opening else 1,
                    groups=_V1_GROUPS,
                    first_groups=1 if (k == 0 and opening) else _V1_GROUPS,
                )
            )
            prev = out_ch
        reduction *= 2
        stages.append(nn.Sequential(*blocks))
        info.append(StageInfo(out_ch, reduction))
    return StagedNet(_stem(in_channels, stem_ch), stages, Head(prev, num_classes), info)


# --------------------------------------------------------------------------------------------------- ShuffleNetV2

_V2_STEM = 24
_V2_STAGES = ((116, 3), (232, 7), (464, 3))  # (output channels, basic units after the down-sampling unit)
_V2_LAST = 1024


class DownUnitV2(nn.Module):
    """Stride-2 unit: both branches see the whole input (dw3x3-1x1 | 1x1-dw3x3-1x1), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


class BasicUnitV2(nn.Module):
    """Stride-1 unit: the first half of the channels passes through, the second half goes 1x1-dw3x3-1x1."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        half = channels - self.keep
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passthrough, processed = x[:, : self.keep], x[:, self.keep :]
        return channel_shuffle(torch.cat([passthrough, self.branch(processed)], dim=1), 2)


@register_model
def shufflenetv2(num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """ShuffleNetV2 1x (116-232-464, 1024 final) for 32x32 inputs, default PyTorch init as in the benchmark.

    Stage channels are kept even so the half split and the 2-group shuffle are exact."""
    stem_ch = _round_to(_V2_STEM * width, 1, 1)
    last_ch = _round_to(_V2_LAST * width, 2, 2)
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 1
    for k, (base, units) in enumerate(_V2_STAGES):
        out_ch = _round_to(base * width, 2, 2)
        blocks: list[nn.Module] = [DownUnitV2(prev, out_ch)]
        blocks += [BasicUnitV2(out_ch) for _ in range(units)]
        prev = out_ch
        if k == len(_V2_STAGES) - 1:
            blocks += [nn.Conv2d(prev, last_ch, 1, bias=False), nn.BatchNorm2d(last_ch), nn.ReLU(inplace=True)]
            prev = last_ch
        reduction *= 2
        stages.append(nn.Sequential(*blocks))
        info.append(StageInfo(prev, reduction))
    return StagedNet(_stem(in_channels, stem_ch), stages, Head(prev, num_classes), info)
