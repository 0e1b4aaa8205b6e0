"""CIFAR VGG with batch norm and no FC stack, as used by the RepDistiller CIFAR-100 benchmark.

Owns vgg8/11/13/16/19: five conv blocks (the stages), max-pools opening blocks 1-3, identity stem."""

from __future__ import annotations

import functools

from torch import nn

from ackd_search.models.base import Head, StagedNet, StageInfo, benchmark_init, register_model

# Convs per block; the benchmark names these configs S (vgg8), A, B, D, E.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
# The benchmark skips the pool before block 4 on 32x32 inputs (it only pools there for 64x64), so the last two
# blocks share a resolution.
_POOL_BEFORE = (False, True, True, True, False)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def cifar_vgg(config: str, num_classes: int, width: float = 1.0, in_channels: int = 3) -> StagedNet:
    """VGG-BN for 32x32 inputs; every conv is 3x3 with bias, followed by BN and ReLU."""
    stages: list[nn.Module] = []
    info: list[StageInfo] = []
    prev, reduction = in_channels, 1
    for convs, pool in zip(_CONFIGS[config], _POOL_BEFORE):
        layers: list[nn.Module] = []
        if pool:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            reduction *= 2
        for base in convs:
            ch = _scaled(base, width)
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            prev = ch
        stages.append(nn.Sequential(*layers))
        info.append(StageInfo(prev, reduction))
    net = StagedNet(nn.Identity(), stages, Head(prev, num_classes), info)
    benchmark_init(net, classifier="normal")
    return net


for _name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19"):
    register_model(functools.partial(cifar_vgg, _name), name=_name)
