"""The objective around one training run: a trial's config (sampled, or replayed for a confirmation run), the
run itself, and everything recorded about it (attributes, curve and config artifacts, the reason it stopped).
`trial_objective` serves `study.optimize`; the Ray Tune backend shares its pieces."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ackd_search.config import RunConfig, to_dict
from ackd_search.runner import run_training
from ackd_search.space import Space
from ackd_search.trainer import CHECKPOINT, NonFiniteLossError, RunResult

OBJECTIVE = "val_acc"  # the student's validation accuracy (%) after the trial's last epoch; maximised
CONFIRMS = "confirms"  # user attribute of a confirmation run: what it confirms (a preset or a trial's config)


@dataclass
class StudyPaths:
    runs: Path
    artifacts: Path

    @classmethod
    def for_space(cls, space: Space) -> StudyPaths:
        name = space.study.name
        return cls(
            runs=Path(space.study.runs_dir or f"studies/{name}-runs"),
            artifacts=Path(space.study.artifacts_dir or f"studies/{name}-artifacts"),
        )



def root_trial_number(trial: optuna.Trial | FrozenTrial) -> int:
    """A re-run trial (after a worker died or a Ctrl-C) shares its original's run folder, so it resumes the
    original's last epoch checkpoint instead of starting over."""
    frozen = trial if isinstance(trial, FrozenTrial) else trial.study._storage.get_trial(trial._trial_id)
    if "retry_of" in frozen.user_attrs:
        return int(frozen.user_attrs["retry_of"])
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return original if original is not None else frozen.number



def trial_attrs(result: RunResult) -> dict[str, Any]:
    teacher = result.teacher or {}
    return {
        "student_params": result.student_params,
        "student_flops": result.student_flops,
        "teacher_val_acc": teacher.get("val_acc"),
        "teacher_arch": teacher.get("arch"),
        "wall_time_s": round(result.wall_time_s, 3),
        "images_per_s": round(result.images_per_s, 1),
        "device": result.device,
        "version": result.version,
        "seed": result.config["seed"],
        "best_val_acc": result.best_val_acc,
        "method": result.config["distill"]["method"],
        "teacher_output_cache": result.teacher_output_cache,  # used | off | off: <why>
        "cuda_graphs": result.cuda_graphs,  # captured | off | eager: <why>
    }



def compact_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("epoch", "val_acc", "val_loss", "lr", "images_per_s")
    return [{**{k: h[k] for k in keep}, "terms": {k: round(v, 6) for k, v in h["terms"].items()}} for h in history]



class OptunaReporter:
    """Per-epoch hook for `train`: report the curve as intermediate values and prune through the trial. Nothing
    grows per epoch in the user attributes (a MySQL Text column holds 64 KB): the whole curve with its loss terms
    is an artifact, written when the trial ends."""

    def __init__(self, trial: optuna.Trial, can_prune: bool, can_report: bool = True, progress: Any = None):
        self.trial, self.can_prune, self.can_report, self.progress = trial, can_prune, can_report, progress
        self.history: list[dict[str, Any]] = []

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if metrics.get("resumed"):  # restored from the epoch checkpoint of an interrupted or killed run
            self.trial.set_user_attr("resumed_from_epoch", epoch)
        if self.progress is not None:
            self.progress.epoch(self.trial.number, epoch, metrics)
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



def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"



# User attributes a re-queued trial keeps from the one it replaces (requeue after Ctrl-C or SIGTERM).
REQUEUE_KEEPS = ("preset", "preset_sampled", CONFIRMS, "confirm_key", "confirm_seed", "confirm_epochs",
                 "confirm_source")


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


def trial_objective(space: Space, paths: StudyPaths, progress: Any = None, sampler_seed: int | None = None):
    """The objective for `study.optimize`: sample a config (or replay a confirmation run's), train it, record
    everything about it. A proposal equal to an earlier trial is not trained twice."""
    from ackd_search.confirm import confirmation_config

    def objective(trial: optuna.Trial):
        started = time.perf_counter()
        confirming = CONFIRMS in trial.user_attrs
        trial.set_user_attr("pid", os.getpid())  # which process ran it (a dead worker's share is made up)
        if sampler_seed is not None:
            trial.set_user_attr("sampler_seed", sampler_seed)
        if confirming:
            cfg, values = confirmation_config(space, trial.study, trial.user_attrs), {}
        else:
            values = space.suggest(trial)
            twin = find_duplicate(trial)
            if twin is not None:
                return _duplicate(trial, twin, space)
            cfg = space.run_config(values)
        root = root_trial_number(trial)
        run_dir = paths.runs / f"trial-{root:05d}"
        cfg.output_dir = str(run_dir)
        set_aside_foreign_checkpoint(trial, run_dir, trial_identity(trial, root))
        upload_config(trial, cfg, run_dir, paths)
        if progress is not None:
            progress.start(trial.number, values)
        reporter = OptunaReporter(trial, can_prune=not (space.multi_objective or confirming),
                                  can_report=not space.multi_objective, progress=progress)
        try:
            result = run_training(cfg, reporter, identity=trial_identity(trial, root))
        except NonFiniteLossError as err:
            trial.set_user_attr("fail_reason", one_line(err))
            stopped_early(trial, cfg, reporter.history, run_dir, paths, started)
            if space.multi_objective:
                raise
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned as err:
            trial.set_user_attr("prune_reason", str(err))
            stopped_early(trial, cfg, reporter.history, run_dir, paths, started)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as err:  # out of memory, a broken config, ...: this trial fails alone
            trial.set_user_attr("fail_reason", one_line(err))
            write_traceback(run_dir)
            upload_curve(trial, reporter.history, run_dir, paths)
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        for key, value in trial_attrs(result).items():
            trial.set_user_attr(key, value)
        upload_curve(trial, reporter.history, run_dir, paths)
        if not confirming:
            upload_best_weights(trial, space, result.final_val_acc, run_dir, paths)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing left to resume
        return objective_values(space, result)

    return objective


def _duplicate(trial: optuna.Trial, twin: FrozenTrial, space: Space):
    """The same parameters as trial `twin`: its value when it finished, else this trial is pruned untrained."""
    trial.set_user_attr("duplicate_of", twin.number)
    if twin.state == TrialState.COMPLETE:
        return twin.values if space.multi_objective else twin.value
    reason = f"same parameters as trial #{twin.number} ({twin.state.name}); not trained twice"
    trial.set_user_attr("prune_reason", reason)
    raise optuna.TrialPruned(reason)


def set_aside_foreign_checkpoint(trial: optuna.Trial, run_dir: Path, identity: dict[str, Any]) -> None:
    """A checkpoint in this trial's run folder that another study left there (a study deleted and started again
    under the same name, another storage file) is never resumed: it is renamed, and the trial starts from scratch."""
    from ackd_search.trainer import CheckpointError, check_owner, load_checkpoint

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
    from ackd_search.models import count_flops, count_parameters, create_model
    from ackd_search.trainer import get_splits

    splits = get_splits(cfg.data)
    student = create_model(cfg.student, splits.num_classes, in_channels=splits.in_channels)
    shape = (1, splits.in_channels, splits.image_size, splits.image_size)
    return count_parameters(student), count_flops(student, shape)


def stopped_early(trial: optuna.Trial, cfg: RunConfig, history: list[dict], run_dir: Path, paths: StudyPaths,
                  started: float) -> None:
    """A pruned (or non-finite) trial keeps its curve, cost and wall time, and leaves no checkpoint behind."""
    params, flops = student_cost(cfg)
    trial.set_user_attr("student_params", params)
    trial.set_user_attr("student_flops", flops)
    trial.set_user_attr("wall_time_s", round(time.perf_counter() - started, 3))
    trial.set_user_attr("epochs_run", len(history))
    upload_curve(trial, history, run_dir, paths)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def upload_config(trial: optuna.Trial, cfg: RunConfig, run_dir: Path, paths: StudyPaths) -> None:
    """The trial's complete run config, as evaluated, is an artifact (`export` reads it back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(json.dumps(to_dict(cfg), indent=1))
    artifact_id = upload_artifact(artifact_store=artifact_store(paths), file_path=str(path), study_or_trial=trial,
                                  mimetype="application/json")
    trial.set_user_attr("config_artifact_id", artifact_id)


def write_traceback(run_dir: Path) -> None:
    """The whole traceback of a failed trial goes to its run folder; the study keeps the one-line reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.log").write_text(traceback.format_exc())



def artifact_store(paths: StudyPaths) -> FileSystemArtifactStore:
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(paths.artifacts))



def upload_curve(trial: optuna.Trial, history: list[dict], run_dir: Path, paths: StudyPaths) -> None:
    if not history:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = run_dir / "curve.json"
    compact = compact_history(history)
    curve.write_text(json.dumps(compact, indent=1))
    upload_artifact(artifact_store=artifact_store(paths), file_path=str(curve), study_or_trial=trial,
                    mimetype="application/json")
    try:  # the dashboard's readable view (note + loss-term plot); it never decides a trial's fate
        from ackd_search.notes import annotate_trial, load_config

        annotate_trial(trial, compact, load_config(trial, run_dir, paths), run_dir, paths)
    except Exception as err:
        trial.set_user_attr("note_error", one_line(err))



def upload_best_weights(trial: optuna.Trial, space: Space, final_val_acc: float, run_dir: Path,
                        paths: StudyPaths) -> None:
    """Keep the student's weights of every trial that improves on the best so far (every trial when multi-objective);
    skipped when they are not on this machine's disk (a Ray worker elsewhere without a shared file system)."""
    if not space.multi_objective:
        done = [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if done and final_val_acc <= max(done):
            return
    weights = run_dir / "student.pt"
    if weights.exists():
        upload_artifact(artifact_store=artifact_store(paths), file_path=str(weights), study_or_trial=trial,
                        mimetype="application/octet-stream")
        trial.set_user_attr("weights_artifact", True)
