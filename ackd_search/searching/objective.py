"""The objective around one training run: a trial's config (sampled, or replayed for a confirmation run), the run
itself, and everything recorded about it (attributes, curve and config artifacts, the reason it stopped), written
only while the attempt owns the trial's run folder. `TrialObjective` serves the trial loop; the Ray Tune backend
shares its pieces."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ackd_search.config import RunConfig
from ackd_search.data import get_splits
from ackd_search.errors import CheckpointError, one_line
from ackd_search.models import count_flops, count_parameters, create_model
from ackd_search.searching.artifacts import (
    stored_config,
    trial_attrs,
    upload_best_weights,
    upload_config,
    upload_curve,
    upload_val_correct,
    write_traceback,
)
from ackd_search.searching.confirm import confirmation_config
from ackd_search.searching.hooks import QUIET, SearchHooks
from ackd_search.searching.record import CONFIRMS, StudyPaths, root_trial_number
from ackd_search.searching.resilient import StorageOutage
from ackd_search.searching.space import Space
from ackd_search.training import CHECKPOINT, NonFiniteLossError, RunResult, check_owner, load_checkpoint, run_training
from ackd_search.training.checkpoints import OWNER_KEY, NotOwner, claim_run_dir, owned


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """A live trial's current record (user attributes included)."""
    return trial.study._storage.get_trial(trial._trial_id)


class OptunaReporter:
    """Per-epoch hook for `train`: report the curve as intermediate values and prune through the trial. Nothing
    grows per epoch in the user attributes (a MySQL Text column holds 64 KB): the whole curve with its loss terms
    is an artifact, written when the trial ends."""

    def __init__(self, trial: optuna.Trial, can_prune: bool, can_report: bool = True, hooks: SearchHooks = QUIET):
        self.trial, self.can_prune, self.can_report, self.hooks = trial, can_prune, can_report, hooks
        self.history: list[dict[str, Any]] = []

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if metrics.get("resumed"):  # restored from the epoch checkpoint of an interrupted or killed run
            self.trial.set_user_attr("resumed_from_epoch", epoch)
        self.hooks.epoch(self.trial.number, epoch, metrics)
        if self.can_report:
            self.trial.report(metrics["val_acc"], epoch)
        if self.can_prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: val_acc {metrics['val_acc']:.2f} below the "
                                     "pruner's cut among trials of its method")


def objective_values(space: Space, result: RunResult) -> float | tuple[float, float]:
    if not space.multi_objective:
        return result.final_val_acc
    second = result.student_flops if space.study.second_objective == "student_flops" else result.student_params
    return result.final_val_acc, float(second)


def find_duplicate(trial: optuna.Trial) -> FrozenTrial | None:
    """A search trial (not a confirmation run, not a failure) with exactly this trial's parameters."""
    for other in trial.study.get_trials(deepcopy=False):
        if (other.number != trial.number and CONFIRMS not in other.user_attrs and other.params == trial.params
                and other.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)):
            return other
    return None


def trial_identity(trial: optuna.Trial, root: int) -> dict[str, Any]:
    """What a trial's checkpoint must match to be resumed: this study (not an earlier one of the same name) and
    the trial whose run folder it is."""
    return {"study": trial.study.study_name, "study_uid": trial.study.user_attrs.get("study_uid"), "trial": root}


def record_curve(trial: optuna.Trial, history: list[dict], run_dir, paths: StudyPaths, hooks: SearchHooks) -> None:
    """The curve as an artifact, then the watchers' turn (the dashboard note); a note never decides a trial's fate."""
    compact = upload_curve(trial, history, run_dir, paths)
    if not compact:
        return
    try:
        hooks.trial_recorded(trial, compact, stored_config(trial, paths, run_dir) or {}, run_dir, paths)
    except (NotOwner, StorageOutage):
        raise
    except Exception as err:
        trial.set_user_attr("note_error", one_line(err))


def claim(trial: optuna.Trial, run_dir: Path) -> str:
    """Make this attempt the only writer of `run_dir` (its trial's folder, shared with every re-run of it); the
    token goes with the run's identity, so the training loop checks it before each checkpoint too."""
    token = secrets.token_hex(8)
    claim_run_dir(run_dir, {"token": token, "trial": trial.number, "trial_id": trial._trial_id, "pid": os.getpid(),
                            "host": socket.gethostname()})
    return token


# Errors that are not the trial's: it was taken over (NotOwner; Optuna's UpdateFinishedTrialError when its state
# was set by another process first), or the storage is away. None of them may be written as the trial's failure.
NOT_THE_TRIALS = (NotOwner, StorageOutage, optuna.exceptions.UpdateFinishedTrialError)


class TrialObjective:
    """The objective of the trial loop (`trial_loop.run_trials`): sample a config (or replay a confirmation run's:
    `search_study` holds the trials it confirms), train it, record everything about it. A proposal equal to an
    earlier trial is not trained twice. `told` runs once the trial's end is stored: only then is the last
    checkpoint removed, so a run that finished while the storage was away is resumed, not lost."""

    def __init__(self, space: Space, paths: StudyPaths, hooks: SearchHooks = QUIET, sampler_seed: int | None = None,
                 search_study: optuna.Study | None = None):
        self.space, self.paths, self.hooks = space, paths, hooks
        self.sampler_seed, self.search_study = sampler_seed, search_study
        self.runs: dict[int, tuple[Path, str, bool]] = {}  # trial id -> run folder, owner token, discard on FAIL

    def __call__(self, trial: optuna.Trial):
        try:
            return self._objective(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise NotOwner("it was failed by another process (its heartbeat was older than study.grace_period_s) "
                           "and is re-run as a new trial") from None

    def told(self, frozen_trial: FrozenTrial) -> None:
        """The trial's end is in the storage: a finished run leaves nothing to resume."""
        run_dir, token, discard = self.runs.pop(frozen_trial._trial_id, (None, None, False))
        if run_dir is None:
            return
        if frozen_trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or discard:
            with contextlib.suppress(NotOwner, OSError), owned(run_dir, token):
                (run_dir / CHECKPOINT).unlink(missing_ok=True)

    def _objective(self, trial: optuna.Trial):
        space, paths, hooks = self.space, self.paths, self.hooks
        started = time.perf_counter()
        confirming = CONFIRMS in trial.user_attrs
        trial.set_user_attr("pid", os.getpid())  # which process ran it (a dead worker's share is made up)
        if self.sampler_seed is not None:
            trial.set_user_attr("sampler_seed", self.sampler_seed)
        if confirming:
            cfg, values = confirmation_config(space, self.search_study or trial.study, trial.user_attrs), {}
        else:
            values = space.suggest(trial)
            twin = find_duplicate(trial)
            if twin is not None:
                return copy_duplicate(trial, twin, space)
            cfg = space.run_config(values)
        root = root_trial_number(frozen(trial))
        run_dir = paths.run_dir(root)
        token = claim(trial, run_dir)
        self.runs[trial._trial_id] = (run_dir, token, False)
        identity = {**trial_identity(trial, root), OWNER_KEY: token}
        cfg.output_dir = str(run_dir)
        reporter = OptunaReporter(trial, can_prune=not (space.multi_objective or confirming),
                                  can_report=not space.multi_objective, hooks=hooks)
        try:
            with owned(run_dir, token):
                set_aside_foreign_checkpoint(trial, run_dir, trial_identity(trial, root))
                upload_config(trial, cfg, run_dir, paths)
            hooks.trial_started(trial.number, values)
            result = run_training(cfg, reporter, identity=identity, teacher_progress=hooks.teacher_progress)
            for key, value in trial_attrs(result).items():
                trial.set_user_attr(key, value)
            with owned(run_dir, token):
                record_curve(trial, reporter.history, run_dir, paths, hooks)
                if confirming:
                    upload_val_correct(trial, result.val_correct, run_dir, paths)
                else:
                    upload_best_weights(trial, space.multi_objective, result.final_val_acc, run_dir, paths)
            return objective_values(space, result)
        except NOT_THE_TRIALS:
            raise
        except NonFiniteLossError as err:
            trial.set_user_attr("fail_reason", one_line(err))
            self.runs[trial._trial_id] = (run_dir, token, True)  # diverged: nothing worth resuming
            with owned(run_dir, token):
                stopped_early(trial, cfg, reporter.history, run_dir, paths, started, hooks)
            if space.multi_objective:
                raise
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned as err:
            trial.set_user_attr("prune_reason", str(err))
            with owned(run_dir, token):
                stopped_early(trial, cfg, reporter.history, run_dir, paths, started, hooks)
            raise
        except KeyboardInterrupt:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # Ctrl-C wins, whoever ended it
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as err:  # out of memory, a broken config, a full disk, ...: this trial fails alone
            trial.set_user_attr("fail_reason", one_line(err))
            with owned(run_dir, token):
                write_traceback(run_dir)
                with contextlib.suppress(OSError):  # the curve so far, where the disk still takes it
                    record_curve(trial, reporter.history, run_dir, paths, hooks)
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise


def trial_objective(space: Space, paths: StudyPaths, hooks: SearchHooks = QUIET, sampler_seed: int | None = None,
                    search_study: optuna.Study | None = None) -> TrialObjective:
    return TrialObjective(space, paths, hooks, sampler_seed, search_study)


def copy_duplicate(trial: optuna.Trial, twin: FrozenTrial, space: Space):
    """The same parameters as trial `twin`: its value when it finished, else this trial is pruned untrained."""
    trial.set_user_attr("duplicate_of", twin.number)
    if twin.state == TrialState.COMPLETE:
        return twin.values if space.multi_objective else twin.value
    reason = f"same parameters as trial #{twin.number} ({twin.state.name}); not trained twice"
    trial.set_user_attr("prune_reason", reason)
    raise optuna.TrialPruned(reason)


def set_aside_foreign_checkpoint(trial: optuna.Trial, run_dir, identity: dict[str, Any]) -> None:
    """A checkpoint in this trial's run folder that another study left there (a study deleted and started again
    under the same name, another storage file) is never resumed: it is renamed, and the trial starts from scratch."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return
    try:
        check_owner(path, load_checkpoint(path), identity)
        return
    except CheckpointError as err:
        reason = str(err)
    aside = path.with_name(f"checkpoint.foreign-{int(time.time())}.pt")
    path.rename(aside)
    trial.set_user_attr("foreign_checkpoint", f"{reason.split(';')[0]}; moved to {aside.name}, not resumed")


def student_cost(cfg: RunConfig) -> tuple[int, int]:
    """Parameters and FLOPs of the deployed student, without training it."""
    splits = get_splits(cfg.data)
    student = create_model(cfg.student, splits.num_classes, in_channels=splits.in_channels)
    shape = (1, splits.in_channels, splits.image_size, splits.image_size)
    return count_parameters(student), count_flops(student, shape)


def stopped_early(trial: optuna.Trial, cfg: RunConfig, history: list[dict], run_dir, paths: StudyPaths,
                  started: float, hooks: SearchHooks = QUIET) -> None:
    """A pruned (or non-finite) trial keeps its curve, cost and wall time; its checkpoint goes once it is told."""
    params, flops = student_cost(cfg)
    trial.set_user_attr("student_params", params)
    trial.set_user_attr("student_flops", flops)
    trial.set_user_attr("wall_time_s", round(time.perf_counter() - started, 3))
    trial.set_user_attr("epochs_run", len(history))
    record_curve(trial, history, run_dir, paths, hooks)
