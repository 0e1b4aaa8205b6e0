"""The training step as a CUDA graph: warm-up on a side stream, one capture per step shape, a replay per full batch,
with the learning rate, loss weights, sums and the cached teacher rows read from device tensors filled in place.
Any failure before the graph exists (preparing, warming up, capturing) ends in the eager step, said in one line."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from ackd_search.config import RunConfig
from ackd_search.errors import one_line
from ackd_search.notices import notice
from ackd_search.training.device import autocast_for
from ackd_search.training.graph_safe import GraphSafeOptimizer, portable_state, set_capturable
from ackd_search.training.sums import EpochSums

__all__ = ["CapturedStep", "GraphSafeOptimizer", "StepHost", "portable_state", "set_capturable"]


class StepHost(Protocol):
    """What the captured step needs of the run it steps for (`loop.Run`)."""

    cfg: RunConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    distiller: Any
    sums: EpochSums
    teacher_outputs: Any
    graphs_status: str

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, autocast=None, rows: torch.Tensor | None = None,
             teacher_out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None: ...


class CapturedStep:
    """The training step as a CUDA graph: for each step shape (`Distiller.step_key`), WARMUP_STEPS real steps run
    eagerly on a side stream, the next full batch is captured, and every full batch after it is a copy into the
    static batch buffers plus one replay. The epoch's partial last batch runs eagerly (the same step, uncaptured).

    `capture=False` runs the same graph-safe step (static buffers, tensor lr, fused SGD, on-device sums, the cached
    teacher rows gathered inside the step) eagerly: what the tests check on a CPU against the plain step. On a CPU
    with `capture=True` the warm-up runs without a side stream and the capture fails: the eager fallback's path."""

    WARMUP_STEPS = 3

    def __init__(self, run: StepHost, capture: bool = True):
        self.run, self.capture = run, capture
        self.optimizer = GraphSafeOptimizer(run.optimizer, run.device)
        self.autocast = autocast_for(run.cfg, run.device, cache_enabled=False)
        self.batch_size = run.cfg.optim.batch_size
        self.key: object = object()  # no step shape yet
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_y = self.static_rows = None
        self.static_t: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.warm = 0
        self.names: set[str] = set()
        self.failed: str | None = None
        self.side = torch.cuda.Stream(run.device) if run.device.type == "cuda" else None
        if capture and run.device.type == "cuda":  # capturable Adam exists on CUDA only
            set_capturable(run.distiller.adversary_optimizer, run.device)

    def begin_epoch(self, epoch: int) -> None:
        if self.failed is not None:
            return
        try:
            self.optimizer.ensure_momentum_buffers()  # any parameter may get its first gradient in any epoch
        except Exception as err:
            self.give_up(f"graph-safe optimizer: {one_line(err)}")
            return
        self.optimizer.load_lr()
        key = self.run.distiller.step_key(epoch)
        if key != self.key:  # a new step shape (e.g. the adversary switched on): warm up and capture again
            self.key, self.graph, self.static_x, self.static_y, self.warm = key, None, None, None, 0
            self.static_rows = self.static_t = None

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, rows: torch.Tensor | None = None) -> None:
        if self.failed is not None or x.shape[0] != self.batch_size:
            self.run.step(x, y, epoch, rows=rows)
            return
        if not self.capture:
            self._load(x, y, rows)
            with self.optimizer:
                self._static_step(epoch)
            return
        if self.graph is None:
            if self.warm < self.WARMUP_STEPS:
                self._warmup(x, y, epoch, rows)
                return
            if not self._capture(x, y, epoch, rows):
                self.run.step(x, y, epoch, rows=rows)
                return
        self._load(x, y, rows)
        self.graph.replay()
        self.run.sums.seen |= self.names

    def _static_step(self, epoch: int) -> None:
        """The step on the static buffers: the cached teacher outputs are gathered inside it (a device index op on
        the static row buffer) when the cache is on the device, or were gathered into static buffers by `_load`."""
        self.run.step(self.static_x, self.static_y, epoch, self.autocast, rows=self.static_rows,
                      teacher_out=self.static_t)

    def _load(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        outputs = self.run.teacher_outputs
        if rows is None or outputs is None:
            return
        if outputs.in_graph:  # whole arrays or the epoch's rows on the device: indexed inside the step
            if self.static_rows is None:
                self.static_rows = torch.empty_like(rows)
            self.static_rows.copy_(rows)
            return
        logits, pooled = outputs.gather(rows)  # host memmap (a CPU run): gathered here, copied into buffers
        if self.static_t is None:
            self.static_t = (torch.empty_like(logits), torch.empty_like(pooled) if pooled is not None else None)
        self.static_t[0].copy_(logits)
        if pooled is not None:
            self.static_t[1].copy_(pooled)

    def _side_stream(self):
        """The stream warm-up steps run on (as CUDA graph capture wants them); none on a CPU."""
        if self.side is None:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream(self.run.device))
        return torch.cuda.stream(self.side)

    def _warmup_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, rows: torch.Tensor | None) -> None:
        with self._side_stream(), self.optimizer:
            self.run.step(x, y, epoch, self.autocast, rows=rows)

    def _warmup(self, x: torch.Tensor, y: torch.Tensor, epoch: int, rows: torch.Tensor | None = None) -> None:
        """A real training step through the graph-safe optimizer, eager. A failure hands the run to the eager step,
        this batch included: a step that raised before its updates loses nothing (the fused SGD refuses its
        arguments before it writes); one that raised after the adversary's own Adam step repeats that step once."""
        try:
            self._warmup_step(x, y, epoch, rows)
        except Exception as err:
            self._join_side_stream()
            self._drop_grads()
            self.give_up(f"warm-up failed: {one_line(err)}")
            self.run.step(x, y, epoch, rows=rows)
            return
        self._join_side_stream()
        self.warm += 1

    def _join_side_stream(self) -> None:
        if self.side is not None:
            torch.cuda.current_stream(self.run.device).wait_stream(self.side)

    def _capture(self, x: torch.Tensor, y: torch.Tensor, epoch: int, rows: torch.Tensor | None = None) -> bool:
        seen_before, self.run.sums.seen = self.run.sums.seen, set()
        try:
            self._load(x, y, rows)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.run.device)
            with self.optimizer, torch.cuda.graph(graph):
                self._static_step(epoch)
        except Exception as err:  # the trial goes on eagerly; the reason is said once
            self._drop_grads()
            self.run.sums.seen = seen_before
            self.give_up(f"capture failed: {one_line(err)}")
            return False
        self.names, self.run.sums.seen = self.run.sums.seen, seen_before  # the terms the graph adds to
        self.graph = graph
        return True  # capturing ran nothing: the caller replays this batch

    def _drop_grads(self) -> None:
        self.run.optimizer.zero_grad(set_to_none=True)
        if self.run.distiller.adversary_optimizer is not None:
            self.run.distiller.adversary_optimizer.zero_grad(set_to_none=True)

    def give_up(self, why: str) -> None:
        self.failed = why
        self.graph = None
        self.run.graphs_status = f"eager: {why}"
        notice(f"cuda_graphs: {why}; continuing eagerly")
