"""Model size and cost: parameter counts and forward FLOPs measured by torch's own FLOP counter.

FLOPs follow `torch.utils.flop_counter` (2 per multiply-add, convolutions and matmuls only; BN, ReLU, pooling free)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Every parameter element, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """FLOPs of one eval-mode forward pass on a zero input of `input_shape` (batch included)."""
    # Remember each submodule's own mode: a frozen teacher inside a training model must stay in eval.
    modes = {m: m.training for m in model.modules()}
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(input_shape, device=device, dtype=dtype))
        return int(counter.get_total_flops())
    finally:
        for m, mode in modes.items():
            m.training = mode
