"""The training step as a CUDA graph: warm-up on a side stream, one capture per step shape, a replay per full batch,
with the learning rate, loss weights and sums as device tensors; and the graph-safe optimizer settings it needs."""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch

from ackd_search.config import RunConfig
from ackd_search.errors import one_line
from ackd_search.training.device import autocast_for
from ackd_search.training.sums import EpochSums


class StepHost(Protocol):
    """What the captured step needs of the run it steps for (`loop.Run`)."""

    cfg: RunConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    distiller: Any
    sums: EpochSums
    teacher_outputs: Any
    graphs_status: str

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, autocast=None, views: torch.Tensor | None = None,
             teacher_out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None: ...


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



class CapturedStep:
    """The training step as a CUDA graph: for each step shape (`Distiller.step_key`), WARMUP_STEPS real steps run
    eagerly on a side stream, the next full batch is captured, and every full batch after it is a copy into the
    static batch buffers plus one replay. The epoch's partial last batch runs eagerly (the same step, uncaptured).

    `capture=False` runs the same graph-safe step (static buffers, tensor lr, fused SGD, on-device sums) eagerly:
    what the tests check on a CPU against the plain step."""

    WARMUP_STEPS = 3

    def __init__(self, run: StepHost, capture: bool = True):
        self.run, self.capture = run, capture
        self.optimizer = GraphSafeOptimizer(run.optimizer, run.device)
        self.autocast = autocast_for(run.cfg, run.device, cache_enabled=False)
        self.batch_size = run.cfg.optim.batch_size
        self.key: object = object()  # no step shape yet
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_y = self.static_v = None
        self.static_t: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.warm = 0
        self.names: set[str] = set()
        self.failed: str | None = None
        if capture:
            set_capturable(run.distiller.adversary_optimizer, run.device)

    def begin_epoch(self, epoch: int) -> None:
        self.optimizer.load_lr()
        key = self.run.distiller.step_key(epoch)
        if key != self.key:  # a new step shape (e.g. the adversary switched on): warm up and capture again
            self.key, self.graph, self.static_x, self.static_y, self.warm = key, None, None, None, 0
            self.static_v = self.static_t = None

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, views: torch.Tensor | None = None) -> None:
        if self.failed is not None or x.shape[0] != self.batch_size:
            self.run.step(x, y, epoch, views=views)
            return
        if not self.capture:
            self._load(x, y, views)
            with self.optimizer:
                self._static_step(epoch)
            return
        if self.graph is None:
            if self.warm < self.WARMUP_STEPS:
                self._warmup(x, y, epoch, views)
                return
            if not self._capture(x, y, epoch, views):
                self.run.step(x, y, epoch, views=views)
                return
        self._load(x, y, views)
        self.graph.replay()
        self.run.sums.seen |= self.names

    def _static_step(self, epoch: int) -> None:
        """The step on the static buffers: the cached teacher outputs are gathered inside it (a device index op on
        the static view buffer) when the cache is on the device, or were gathered into static buffers by `_load`."""
        self.run.step(self.static_x, self.static_y, epoch, self.autocast, views=self.static_v,
                      teacher_out=self.static_t)

    def _load(self, x: torch.Tensor, y: torch.Tensor, views: torch.Tensor | None = None) -> None:
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        outputs = self.run.teacher_outputs
        if views is None or outputs is None:
            return
        if outputs.on_device:
            if self.static_v is None:
                self.static_v = torch.empty_like(views)
            self.static_v.copy_(views)
            return
        logits, pooled = outputs.gather(views)  # host memmap: gathered outside the graph, copied into buffers
        if self.static_t is None:
            self.static_t = (torch.empty_like(logits), torch.empty_like(pooled) if pooled is not None else None)
        self.static_t[0].copy_(logits)
        if pooled is not None:
            self.static_t[1].copy_(pooled)

    def _warmup(self, x: torch.Tensor, y: torch.Tensor, epoch: int, views: torch.Tensor | None = None) -> None:
        """A real training step, eager, on a side stream (as CUDA graph capture wants its warm-up)."""
        main = torch.cuda.current_stream(self.run.device)
        side = torch.cuda.Stream(self.run.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), self.optimizer:
            self.run.step(x, y, epoch, self.autocast, views=views)
        main.wait_stream(side)
        self.warm += 1

    def _capture(self, x: torch.Tensor, y: torch.Tensor, epoch: int, views: torch.Tensor | None = None) -> bool:
        self._load(x, y, views)
        seen_before, self.run.sums.seen = self.run.sums.seen, set()
        try:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.run.device)
            with self.optimizer, torch.cuda.graph(graph):
                self._static_step(epoch)
        except Exception as err:  # the trial goes on eagerly; the reason is said once
            self.run.optimizer.zero_grad(set_to_none=True)
            if self.run.distiller.adversary_optimizer is not None:
                self.run.distiller.adversary_optimizer.zero_grad(set_to_none=True)
            self.run.sums.seen = seen_before
            self.give_up(f"capture failed: {one_line(err)}")
            return False
        self.names, self.run.sums.seen = self.run.sums.seen, seen_before  # the terms the graph adds to
        self.graph = graph
        return True  # capturing ran nothing: the caller replays this batch

    def give_up(self, why: str) -> None:
        self.failed = why
        self.run.graphs_status = f"eager: {why}"
        print(f"ackd-search: cuda_graphs: {why}; continuing eagerly", file=sys.stderr, flush=True)

