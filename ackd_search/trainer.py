"""One training run: data on the device, the distiller, SGD and its schedule, evaluation, checkpoints; on CUDA the
training step is captured as a CUDA graph and replayed.

`train(cfg, reporter, splits=..., teacher=..., teacher_info=...)` trains what it is handed: the caller builds the data
splits and the teacher (`ackd_search.runner.run_training` does, for trials and the final training). Nothing here
knows about Optuna or Ray: the search prunes by raising from `reporter`."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ackd_search import __version__
from ackd_search.config import DataConfig, RunConfig, save_run_config, to_dict, with_absolute_paths
from ackd_search.data import DataSplits, DeviceLoader, load_splits
from ackd_search.distill import build_distiller
from ackd_search.models import StagedNet, count_flops, count_parameters, create_model

Reporter = Callable[[int, dict[str, Any]], None]
CHECKPOINT = "checkpoint.pt"
NONFINITE_CHECK_EVERY = 20  # batches between loss checks; each check is one host sync


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, another run config, study or code version): one line."""


@dataclass
class RunResult:
    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_val_acc: float
    final_val_acc: float
    test_acc: float | None
    student_params: int
    student_flops: int
    teacher: dict[str, Any] | None
    device: str
    wall_time_s: float
    images_per_s: float
    version: str = __version__
    cuda_graphs: str = "off"  # "captured", "off", or "eager: <why capture was not used>"
    teacher_output_cache: str = "off"  # "used", "off", or "off: <why>" (ackd_search/output_cache.py)
    student_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "student_state"}
        return out


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


@functools.lru_cache(maxsize=4)
def _cached_splits(name: str, data_root: str, val_fraction: float, split_seed: int, download: bool, limit):
    return load_splits(name, data_root, val_fraction, split_seed, download, limit)


def get_splits(cfg: DataConfig) -> DataSplits:
    """Data sets are read once per process; every trial of a search shares the same tensors."""
    return _cached_splits(cfg.name, cfg.data_root, cfg.val_fraction, cfg.split_seed, cfg.download, cfg.limit)


def autocast_for(cfg: RunConfig, device: torch.device, cache_enabled: bool = True):
    """The autocast context (a factory) `cfg` asks for on `device`; a captured step needs `cache_enabled=False`
    (autocast's cast cache would hold tensors of the capture's memory pool past the step)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                             cache_enabled=cache_enabled)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, autocast) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` over `loader`."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=loader.device)
    for x, y in loader:
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = loader.num_samples
    return 100.0 * correct.item() / n, loss_sum.item() / n


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig):
    if cfg.optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.optim.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.optim.scaled_milestones(), gamma=cfg.optim.lr_decay)


def build_student(cfg: RunConfig, splits: DataSplits) -> StagedNet:
    return create_model(cfg.student, splits.num_classes, in_channels=splits.in_channels)


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint under `path`."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(err)}") from None


_WEIGHTS_ONLY_ADVICE = ("Weights only load failed", "(1) In PyTorch", "(2) Alternatively", "Please file an issue",
                        "Check the documentation")


def _load_failure(err: BaseException) -> str:
    """One line of why torch.load failed. Its weights_only message opens with advice to load unsafely (even for
    a file of random bytes) and carries terminal colour codes; the actual reason is on a later line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if not text.startswith(_WEIGHTS_ONLY_ADVICE[0]):
        return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)[:200]
    detail = text.split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    reason = next((line for line in lines if not line.startswith(_WEIGHTS_ONLY_ADVICE)), "not a plain state dict")
    return f"refused by weights_only=True loading: {reason}"[:200]


class _EpochSums:
    """Running sums of the loss and its named terms over an epoch, and the non-finite flag, as device tensors added
    to in place: a captured step adds into the same memory on every replay, and nothing syncs with the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)
        self.terms: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()  # names the epoch's steps produced (a captured step's are added per replay)

    def reset(self) -> None:
        self.loss.zero_()
        self.bad.zero_()
        for total in self.terms.values():
            total.zero_()
        self.seen = set()

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        loss = loss.detach()
        self.loss += loss
        self.bad |= ~torch.isfinite(loss)
        for name, value in terms.items():
            total = self.terms.get(name)
            if total is None:
                total = self.terms[name] = torch.zeros((), device=self.device)
            total += value.float()
            self.seen.add(name)

    def means(self, batches: int) -> dict[str, float]:
        out = {name: self.terms[name].item() / batches for name in self.terms if name in self.seen}
        out["loss"] = self.loss.item() / batches
        return out


class _GraphSafeOptimizer:
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

    def __enter__(self) -> _GraphSafeOptimizer:
        self._saved = [(g["lr"], g["foreach"], g["fused"]) for g in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            group["lr"], group["foreach"], group["fused"] = lr, False, True
        return self

    def __exit__(self, *exc: object) -> None:
        for group, (lr, foreach, fused) in zip(self.optimizer.param_groups, self._saved):
            group["lr"], group["foreach"], group["fused"] = lr, foreach, fused


def _set_capturable(optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """Let an Adam-style optimizer (the adversary's) step inside a CUDA graph: its step counts move to the device."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
    optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up and partial batches run it uncaptured


def _portable_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state dict as an eager run writes it (capturable off), whichever way this run stepped."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if "capturable" in group:
            group["capturable"] = False
    return state


def one_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


class _CapturedStep:
    """The training step as a CUDA graph: for each step shape (`Distiller.step_key`), WARMUP_STEPS real steps run
    eagerly on a side stream, the next full batch is captured, and every full batch after it is a copy into the
    static batch buffers plus one replay. The epoch's partial last batch runs eagerly (the same step, uncaptured).

    `capture=False` runs the same graph-safe step (static buffers, tensor lr, fused SGD, on-device sums) eagerly:
    what the tests check on a CPU against the plain step."""

    WARMUP_STEPS = 3

    def __init__(self, run: _Run, capture: bool = True):
        self.run, self.capture = run, capture
        self.optimizer = _GraphSafeOptimizer(run.optimizer, run.device)
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
            _set_capturable(run.distiller.adversary_optimizer, run.device)

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


class _Run:
    """State of one run; methods are the steps of `train`, kept short enough to read."""

    def __init__(self, cfg: RunConfig, reporter: Reporter | None, *, splits: DataSplits,
                 teacher: torch.nn.Module | None, teacher_info: dict[str, Any] | None,
                 identity: dict[str, Any] | None = None, teacher_outputs: Any = None,
                 teacher_output_cache: str = "off"):
        self.cfg, self.reporter, self.identity = cfg, reporter, identity
        # The teacher-output cache (an output_cache.TeacherOutputs, built by the caller) or None: run the teacher.
        self.teacher_outputs = teacher_outputs
        self.output_cache_status = teacher_output_cache
        self.device = resolve_device(cfg.device)
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.autocast = autocast_for(cfg, self.device)
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else None
        self.splits = splits
        self.teacher, self.teacher_info = teacher, teacher_info
        # Seeded after the teacher: whether it was trained now or read from the cache must not move the student.
        seed_everything(cfg.seed)
        student = build_student(cfg, self.splits)
        shape = (1, self.splits.in_channels, self.splits.image_size, self.splits.image_size)
        self.student_params, self.student_flops = count_parameters(student), count_flops(student, shape)
        self.distiller = build_distiller(cfg.distill, student, self.teacher, cfg.optim, cfg.student)
        self.distiller.to(self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            self.distiller.trainable_parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.train_loader = self._loader(self.splits.train, shuffle=True)
        self.val_loader = self._loader(self.splits.val, shuffle=False)
        self.sums = _EpochSums(self.device)
        self.graphs_status = "off"
        self.captured: _CapturedStep | None = None
        self._engine_ready = False
        if cfg.compile:
            for module in self.distiller.compile_targets():
                module.compile()

    def _loader(self, split, shuffle: bool) -> DeviceLoader:
        s = self.splits
        return DeviceLoader(
            split,
            batch_size=self.cfg.optim.batch_size if shuffle else max(256, self.cfg.optim.batch_size),
            device=self.device,
            mean=s.mean,
            std=s.std,
            augment=s.augment if shuffle else None,
            shuffle=shuffle,
            seed=self.cfg.seed,
            channels_last=self.cfg.channels_last and self.device.type == "cuda",
        )

    def _engine(self) -> _CapturedStep | None:
        """The captured step when `cuda_graphs` asks for it and the device has CUDA, else None (eager steps)."""
        setting = self.cfg.cuda_graphs
        if setting == "off" or (setting == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            self.graphs_status = f"eager: cuda_graphs 'on' needs a CUDA device, this run is on {self.device}"
            print(f"ackd-search: {self.graphs_status[7:]}; continuing eagerly", file=sys.stderr, flush=True)
            return None
        self.graphs_status = "captured"
        return _CapturedStep(self)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir else None

    def save_checkpoint(self, epochs_done: int) -> None:
        path = self.checkpoint_path()
        if path is None:
            return
        adv = self.distiller.adversary_optimizer
        state = {
            "epochs_done": epochs_done,
            "version": __version__,
            "identity": self.identity,
            "config": to_dict(self.cfg),
            "distiller": self.distiller.trained_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "adversary_optimizer": _portable_state(adv) if adv is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
        }
        save_atomic(state, path)

    def maybe_resume(self) -> None:
        path = self.checkpoint_path()
        if path is None or not path.exists():
            return
        state = load_checkpoint(path)
        if not isinstance(state, dict) or "epochs_done" not in state:
            raise CheckpointError(f"{path} is not a training checkpoint of this project; use a new output_dir")
        check_owner(path, state, self.identity)
        if _comparable(state.get("config") or {}) != _comparable(to_dict(self.cfg)):
            raise CheckpointError(f"{path} was written by a different run config; use a new output_dir")
        self.distiller.load_trained_state(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["adversary_optimizer"] is not None:
            self.distiller.adversary_optimizer.load_state_dict(state["adversary_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epochs_done"])

    # --- the loop ------------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, autocast=None, views: torch.Tensor | None = None,
             teacher_out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """One training step: the distiller's forward and losses (and its adversary's own step), backward, SGD,
        and the loss terms added to the epoch's on-device sums. No host sync: a CUDA graph captures it whole.

        With the teacher-output cache, the batch's teacher outputs are `teacher_out`, or gathered by `views`."""
        if teacher_out is None and views is not None and self.teacher_outputs is not None:
            teacher_out = self.teacher_outputs.gather(views)
        with (autocast or self.autocast)():
            _, loss, terms = self.distiller.forward_train(x, y, epoch, teacher_out=teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sums.add(loss, terms)

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        if not self._engine_ready:  # after any resume: the captured step reads the restored optimizer states
            self.captured, self._engine_ready = self._engine(), True
        distiller = self.distiller
        distiller.train()
        distiller.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        self.sums.reset()
        step_fn = self.step
        if self.captured is not None:
            self.captured.begin_epoch(epoch)
            step_fn = self.captured.step
        start = time.perf_counter()
        if self.teacher_outputs is not None:
            batches = self.train_loader.iter_views()
        else:
            batches = ((x, y, None) for x, y in self.train_loader)
        for step, (x, y, views) in enumerate(batches):
            step_fn(x, y, epoch, views=views)
            if step % NONFINITE_CHECK_EVERY == 0 and self.sums.bad.item():
                raise NonFiniteLossError(f"loss became non-finite at epoch {epoch + 1}, batch {step + 1}")
        if self.sums.bad.item():
            raise NonFiniteLossError(f"loss became non-finite at epoch {epoch + 1}")
        terms_mean = self.sums.means(max(1, len(self.train_loader)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return terms_mean, time.perf_counter() - start

    def run(self) -> RunResult:
        self.maybe_resume()
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(self.cfg, self.run_dir / "config.yaml")
        wall_start = time.perf_counter()
        if self.reporter is not None:
            for metrics in self.history:  # epochs restored from a checkpoint: the caller sees the whole curve
                self.reporter(metrics["epoch"], {**metrics, "resumed": True})
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            terms, train_s = self.train_epoch(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            val_acc, val_loss = evaluate(self.distiller.student, self.val_loader, self.autocast)
            metrics = {
                "epoch": epoch + 1,
                "val_acc": val_acc,
                "val_loss": val_loss,
                "lr": lr,
                "train_s": train_s,
                "images_per_s": self.train_loader.num_samples / train_s,
                "terms": terms,
            }
            self.history.append(metrics)
            self.save_checkpoint(epoch + 1)
            if self.reporter is not None:
                self.reporter(epoch + 1, metrics)
        return self.result(time.perf_counter() - wall_start)

    def result(self, wall_s: float) -> RunResult:
        test_acc = None
        student = self.distiller.student
        if self.cfg.eval_test:
            test_loader = self._loader(self.splits.test, shuffle=False)
            test_acc, _ = evaluate(student, test_loader, self.autocast)
        accs = [h["val_acc"] for h in self.history]
        train_s = sum(h["train_s"] for h in self.history)
        images = self.train_loader.num_samples * len(self.history)
        result = RunResult(
            config=to_dict(self.cfg),
            history=self.history,
            best_val_acc=max(accs) if accs else math.nan,
            final_val_acc=accs[-1] if accs else math.nan,
            test_acc=test_acc,
            student_params=self.student_params,
            student_flops=self.student_flops,
            teacher=self.teacher_info,
            device=describe_device(self.device),
            wall_time_s=wall_s,
            images_per_s=images / train_s if train_s > 0 else math.nan,
            cuda_graphs=self.graphs_status,
            teacher_output_cache=self.output_cache_status,
            student_state=self.distiller.export_student(),
        )
        if self.run_dir:
            save_atomic(result.student_state, self.run_dir / "student.pt")
            (self.run_dir / "result.json").write_text(json.dumps(result.summary(), indent=1, default=str))
        return result


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as a checkpoint must match it: paths resolved; `cuda_graphs` left out (it changes how the step
    runs, not what it computes, so a run may resume with it switched)."""
    out = with_absolute_paths(config)
    out.pop("cuda_graphs", None)
    (out.get("teacher") or {}).pop("output_cache", None)  # the same teacher outputs, read or recomputed
    return out


def _describe_owner(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "no study (a plain training run)"
    parts = [f"{key} {value!r}" for key, value in identity.items() if key != "study" and value is not None]
    name = f"study {identity['study']!r}" if "study" in identity else ""
    return " ".join(p for p in (name, f"({', '.join(parts)})" if parts else "") if p)


def check_owner(path: Path, state: dict[str, Any], identity: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written by another code version or for another study / trial, in one line."""
    version = state.get("version")
    if version != __version__:
        written = f"ackd-search {version}" if version else "an older ackd-search (no version recorded)"
        raise CheckpointError(f"{path} was written by {written}, this is {__version__}; "
                              f"delete it or use a new runs folder")
    saved = state.get("identity")
    if (saved or None) != (identity or None):
        raise CheckpointError(f"{path} belongs to {_describe_owner(saved)}, not {_describe_owner(identity)}; "
                              f"delete it or use a new runs folder")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, torch {torch.__version__}"


def train(cfg: RunConfig, reporter: Reporter | None = None, *, splits: DataSplits,
          teacher: torch.nn.Module | None, teacher_info: dict[str, Any] | None,
          identity: dict[str, Any] | None = None, teacher_outputs: Any = None,
          teacher_output_cache: str = "off") -> RunResult:
    """Train `cfg` on `splits` with `teacher` (None for the student alone) to the end, resuming from
    `cfg.output_dir`'s checkpoint if there is one and it belongs to `identity` (the caller's study and trial; None
    for a plain run) and to this code version.

    `teacher_outputs` (an `output_cache.TeacherOutputs`, or None to run the teacher) holds the teacher's outputs for
    every view of the training images; `teacher_output_cache` is its status for `RunResult` ("used", "off: why").

    `reporter(epoch, metrics)` is called after every epoch, after the checkpoint is written; it may raise to stop."""
    return _Run(cfg, reporter, splits=splits, teacher=teacher, teacher_info=teacher_info, identity=identity,
                teacher_outputs=teacher_outputs, teacher_output_cache=teacher_output_cache).run()
