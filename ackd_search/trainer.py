"""One training run: data on the device, the distiller, SGD and its schedule, evaluation, checkpoints.

`train(cfg, reporter)` is the single path used by Optuna trials, Ray Tune trials and the final training.
Nothing here knows about Optuna or Ray: the search prunes by raising from `reporter`."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
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
from ackd_search.distill import Distiller, build_distiller
from ackd_search.models import StagedNet, count_flops, count_parameters, create_model

Reporter = Callable[[int, dict[str, Any]], None]
CHECKPOINT = "checkpoint.pt"
NONFINITE_CHECK_EVERY = 20  # batches between loss checks; each check is one host sync


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


class CheckpointError(ValueError):
    pass


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


def autocast_for(cfg: RunConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


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


class _Run:
    """State of one run; methods are the steps of `train`, kept short enough to read."""

    def __init__(self, cfg: RunConfig, reporter: Reporter | None, splits: DataSplits | None = None,
                 teacher: torch.nn.Module | None = None):
        """`splits` and `teacher`, when given, replace the configured data set and teacher (for benchmarks)."""
        self.cfg, self.reporter = cfg, reporter
        self.device = resolve_device(cfg.device)
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.autocast = autocast_for(cfg, self.device)
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else None
        self.splits = splits if splits is not None else get_splits(cfg.data)
        self.teacher, self.teacher_info = self._teacher() if teacher is None else (teacher, {"arch": "given"})
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
        if cfg.compile:
            for module in self.distiller.compile_targets():
                module.compile()

    def _teacher(self):
        if self.cfg.distill.method == "student":
            return None, None
        from ackd_search.teachers import get_teacher

        teacher, info = get_teacher(self.cfg, self.splits, self.device)
        return teacher, info

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
            "config": to_dict(self.cfg),
            "distiller": self.distiller.trained_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "adversary_optimizer": adv.state_dict() if adv is not None else None,
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
        if with_absolute_paths(state.get("config") or {}) != with_absolute_paths(to_dict(self.cfg)):
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
    def train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        distiller, optimizer = self.distiller, self.optimizer
        distiller.train()
        self.train_loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.device)
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.train_loader):
            with self.autocast():
                _, loss, terms = distiller.forward_train(x, y, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            bad |= ~torch.isfinite(loss.detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.float()
            if step % NONFINITE_CHECK_EVERY == 0 and bad.item():
                raise NonFiniteLossError(f"loss became non-finite at epoch {epoch + 1}, batch {step + 1}")
        if bad.item():
            raise NonFiniteLossError(f"loss became non-finite at epoch {epoch + 1}")
        n = max(1, len(self.train_loader))
        terms_mean = {name: value.item() / n for name, value in sums.items()}
        terms_mean["loss"] = loss_sum.item() / n
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
            student_state=self.distiller.export_student(),
        )
        if self.run_dir:
            save_atomic(result.student_state, self.run_dir / "student.pt")
            (self.run_dir / "result.json").write_text(json.dumps(result.summary(), indent=1, default=str))
        return result


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, torch {torch.__version__}"


def train(cfg: RunConfig, reporter: Reporter | None = None) -> RunResult:
    """Train `cfg` to the end (resuming from `cfg.output_dir`'s checkpoint if there is one).

    `reporter(epoch, metrics)` is called after every epoch, after the checkpoint is written; it may raise to stop."""
    return _Run(cfg, reporter).run()


def distiller_for(cfg: RunConfig) -> Distiller:
    """The distiller `train` would build (teacher included), without training; for tests and benchmarks."""
    return _Run(cfg, None).distiller
