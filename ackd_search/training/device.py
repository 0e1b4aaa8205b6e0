"""Where and how a run computes: the device a config names, its description for results, the seeds, and the autocast
context (bf16 on CUDA by default) that training, evaluation and the teacher-output cache share."""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from ackd_search.config import RunConfig


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device; anything else is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty backends this project does not run on
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; allowed here: auto, cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(cfg: RunConfig, device: torch.device, cache_enabled: bool = True):
    """The autocast context (a factory) `cfg` asks for on `device`; a captured step needs `cache_enabled=False`
    (autocast's cast cache would hold tensors of the capture's memory pool past the step)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                             cache_enabled=cache_enabled)



def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, torch {torch.__version__}"

