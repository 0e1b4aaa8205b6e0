"""The optimizer settings a captured training step needs: the main SGD fused with its learning rate in a device tensor
and a momentum buffer for every parameter before the first graph-safe step; the adversary's Adam capturable; and
the optimizer state as an eager run writes it (what checkpoints hold, whichever way the run stepped)."""

from __future__ import annotations

from typing import Any

import torch


class GraphSafeOptimizer:
    """While active, the main SGD reads its learning rate from a device tensor (fused kernel, tensor lr), so a
    captured step replays with the lr of the current epoch. Outside, the optimizer is exactly the eager one (float
    lr, the default implementation): the scheduler, checkpoints and the eager steps never see the tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]  # fp32: the fused kernel's type
        self._saved: list[tuple[Any, Any, Any]] = []

    def load_lr(self) -> None:
        """Copy the scheduler's current lr into the device tensors (in place; once per epoch, outside the graph)."""
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(float(group["lr"]))

    def ensure_momentum_buffers(self) -> None:
        """Give every parameter a momentum buffer (zeros) before a graph-safe step runs.

        Fused SGD creates the buffers itself only when NONE exists yet; a parameter whose first gradient comes in a
        later epoch (ACKD's feature connectors once the adversary starts) would reach the kernel with `None` and
        fail. Zeros are the first step exactly: with dampening 0, `0 * momentum + grad` is `grad`, bit for bit, which
        is what SGD's first step (`buf = grad`) stores. A parameter that never gets a gradient keeps its zeros: every
        SGD implementation skips parameters without a gradient."""
        for group in self.optimizer.param_groups:
            if group["momentum"] == 0:
                continue
            if group["dampening"] != 0:  # then the first step (buf = grad) differs from a later one ((1 - d) grad)
                raise ValueError(f"SGD dampening {group['dampening']} cannot start from zero momentum buffers")
            for param in group["params"]:
                state = self.optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def __enter__(self) -> GraphSafeOptimizer:
        self._saved = [(g["lr"], g["foreach"], g["fused"]) for g in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            group["lr"], group["foreach"], group["fused"] = lr, False, True
        return self

    def __exit__(self, *exc: object) -> None:
        for group, (lr, foreach, fused) in zip(self.optimizer.param_groups, self._saved):
            group["lr"], group["foreach"], group["fused"] = lr, foreach, fused


def set_capturable(optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """Let an Adam-style optimizer (the adversary's) step inside a CUDA graph: its step counts move to the device."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
    optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up and partial batches run it uncaptured


def portable_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state dict as an eager run writes it (capturable off), whichever way this run stepped."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if "capturable" in group:
            group["capturable"] = False
    return state
