"""One training run: the distiller on the device, SGD and its schedule, the epoch loop (eager or the captured step),
evaluation, checkpoints and the result.

`train(cfg, reporter, splits=..., teacher=..., teacher_info=...)` trains what it is handed: the caller builds the data
splits and the teacher (`runner.run_training` does, for trials and the final training). Nothing here knows about
Optuna or Ray: the search prunes by raising from `reporter`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ackd_search import __version__
from ackd_search.config import RunConfig, save_run_config, to_dict
from ackd_search.data import DataSplits, DeviceLoader
from ackd_search.distill import build_distiller
from ackd_search.files import save_atomic, write_text_atomic
from ackd_search.models import StagedNet, count_flops, count_parameters, initial_model, is_zoo_model
from ackd_search.notices import notice
from ackd_search.training.captured import CapturedStep, portable_state
from ackd_search.training.checkpoints import CHECKPOINT, owned, owner_token, read_checkpoint, write_checkpoint
from ackd_search.training.device import autocast_for, describe_device, resolve_device, seed_everything
from ackd_search.training.sums import EpochSums

Reporter = Callable[[int, dict[str, Any]], None]
NONFINITE_CHECK_EVERY = 20  # batches between loss checks; each check is one host sync


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


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
    # Whether the final student classifies each validation image right, in the split's order: what a comparison
    # of two configurations pairs on, beside their seeds (searching/stats.py).
    val_correct: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("student_state", "val_correct")}


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


@torch.no_grad()
def correct_per_image(model: torch.nn.Module, loader: DeviceLoader, autocast) -> np.ndarray:
    """Whether `model` classifies each image of `loader` right (bool, in the loader's order; it must not shuffle)."""
    was_training = model.training
    model.eval()
    right = []
    for x, y in loader:
        with autocast():
            right.append(model(x).argmax(1) == y)
    model.train(was_training)
    return torch.cat(right).cpu().numpy() if right else np.zeros(0, dtype=bool)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig):
    if cfg.optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.optim.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.optim.scaled_milestones(), gamma=cfg.optim.lr_decay)


def build_student(cfg: RunConfig, splits: DataSplits) -> StagedNet:
    """The student, fresh or from its initial weights (`student_init` / `student_pretrained`), said in one line."""
    student, note = initial_model(cfg.student, splits.num_classes, splits.in_channels, cfg.student_init,
                                  cfg.student_pretrained)
    if note:
        notice(note)
    return student



class Run:
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
        self.sums = EpochSums(self.device)
        self.graphs_status = "off"
        self.captured: CapturedStep | None = None
        self._engine_ready = False
        if cfg.compile:
            for module in self.distiller.compile_targets():
                module.compile()

    def _loader(self, split, shuffle: bool) -> DeviceLoader:
        s = self.splits
        # A last training batch of one image breaks BatchNorm on a 1x1 feature map (library models at small image
        # sizes): that one image is left out of the epoch, and the run says so. Zoo runs are untouched.
        lone = shuffle and len(split) % self.cfg.optim.batch_size == 1 and not is_zoo_model(self.cfg.student)
        if lone:
            notice(f"the last training batch would hold one image ({len(split)} images, batch "
                   f"{self.cfg.optim.batch_size}): it is dropped each epoch, as BatchNorm cannot train on one",
                   once=True)
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
            drop_last=lone,
        )

    def _engine(self) -> CapturedStep | None:
        """The captured step when `cuda_graphs` asks for it and the device has CUDA, else None (eager steps)."""
        setting = self.cfg.cuda_graphs
        if setting == "off" or (setting == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            self.graphs_status = f"eager: cuda_graphs 'on' needs a CUDA device, this run is on {self.device}"
            notice(f"{self.graphs_status[7:]}; continuing eagerly")
            return None
        self.graphs_status = "captured"
        return CapturedStep(self)

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
            "distiller": self.distiller.trained_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "adversary_optimizer": portable_state(adv) if adv is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
        }
        write_checkpoint(path, state, self.identity, self.cfg)

    def maybe_resume(self) -> None:
        path = self.checkpoint_path()
        if path is None or not path.exists():
            return
        state = read_checkpoint(path, self.identity, self.cfg)
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
    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, autocast=None, rows: torch.Tensor | None = None,
             teacher_out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """One training step: the distiller's forward and losses (and its adversary's own step), backward, SGD,
        and the loss terms added to the epoch's on-device sums. No host sync: a CUDA graph captures it whole.

        With the teacher-output cache, the batch's teacher outputs are `teacher_out`, or gathered by `rows` (what
        `TeacherOutputs.rows` gave for the batch: its view ids, or its positions in the epoch's gathered rows)."""
        if teacher_out is None and rows is not None and self.teacher_outputs is not None:
            teacher_out = self.teacher_outputs.gather(rows)
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
        outputs, size = self.teacher_outputs, self.train_loader.batch_size
        if outputs is not None:
            outputs.begin_epoch(self.train_loader)  # the epoch's cached rows, gathered once when not on the device
            batches = self.train_loader.iter_views()
        else:
            batches = ((x, y, None) for x, y in self.train_loader)
        for step, (x, y, views) in enumerate(batches):
            step_fn(x, y, epoch, rows=outputs.rows(views, step * size) if outputs is not None else None)
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
            val_correct=correct_per_image(student, self.val_loader, self.autocast),
        )
        if self.run_dir:
            # Atomic (a full disk leaves the previous files whole) and only while this attempt owns the folder.
            with owned(self.run_dir, owner_token(self.identity)):
                save_atomic(result.student_state, self.run_dir / "student.pt")
                write_text_atomic(self.run_dir / "result.json", json.dumps(result.summary(), indent=1, default=str))
        return result



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
    return Run(cfg, reporter, splits=splits, teacher=teacher, teacher_info=teacher_info, identity=identity,
                teacher_outputs=teacher_outputs, teacher_output_cache=teacher_output_cache).run()
