"""Tiny staged CNNs for scikit-learn's 8x8 grayscale digits, so the whole pipeline can be exercised in seconds.

Owns `digits_cnn_small` (student, ~5k params) and `digits_cnn_large` (teacher, ~75k): 8x8 -> 8 -> 4 -> 2."""

from __future__ import annotations

from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, register_model

_STRIDES = (1, 2, 2)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def digits_cnn(
    stem_channels: int, stage_channels: tuple[int, int, int], num_classes: int, width: float, in_channels: int
) -> StagedNet:
    """Stem conv3x3-BN-ReLU, then three stages of two conv3x3-BN-ReLU; stages 2 and 3 open with stride 2.

    The registered builders keep the registry-wide default `in_channels=3`; pass 1 for the grayscale digits."""
    stem_ch = _scaled(stem_channels, width)
    stem = nn.Sequential(*_conv_bn_relu(in_channels, stem_ch))
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = stem_ch, 1
    for base, stride in zip(stage_channels, _STRIDES):
        ch = _scaled(base, width)
        stages.append(nn.Sequential(*_conv_bn_relu(prev, ch, stride), *_conv_bn_relu(ch, ch)))
        reduction *= stride
        info.append(StageInfo(ch, reduction))
        prev = ch
    net = StagedNet(stem, stages, Head(prev, num_classes), info)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


@register_model
def digits_cnn_small(num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    return digits_cnn(4, (4, 8, 16), num_classes, width, in_channels)


@register_model
def digits_cnn_large(num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    return digits_cnn(16, (16, 32, 64), num_classes, width, in_channels)
