"""The Optuna study: storage (heartbeats + retry), sampler, pruner, the objective around `train()`, artifacts,
terminal progress and the closing summary. `trial_objective` is shared with the Ray Tune backend."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ackd_search import __version__
from ackd_search.config import ConfigError, to_dict
from ackd_search.space import Space, make_pruner, make_sampler
from ackd_search.trainer import CHECKPOINT, NonFiniteLossError, RunResult, train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OBJECTIVE = "val_acc"  # the student's validation accuracy (%) after the trial's last epoch; maximised


class StudyError(RuntimeError):
    """A one-line, user-facing problem with the storage or the study."""


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


_EXAMPLE_URLS = "e.g. sqlite:///studies/x.db, postgresql://user@host/db, mysql+pymysql://user@host/db"


def _parse_url(url: str) -> sqlalchemy.engine.URL:
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        raise StudyError(f"storage {url!r}: not a valid SQLAlchemy URL ({_EXAMPLE_URLS})") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).parent
        if not folder.is_dir():
            raise StudyError(f"storage {safe_url(url)}: folder {folder} does not exist")
    return parsed


def _reason(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def check_storage(url: str) -> None:
    """Reach the database without writing to it, so a bad URL fails before a teacher is trained or a table made."""
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return  # the file is made on first use; its folder was checked
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:
        raise StudyError(f"storage {safe_url(url)}: cannot connect: {_reason(err)}") from None


def make_storage(space: Space, url: str | None = None) -> RDBStorage:
    """An RDB storage with heartbeats: a worker killed mid-trial leaves it RUNNING, the next worker marks it FAIL
    after the grace period and re-runs its parameters (resuming from the trial's last epoch checkpoint)."""
    url = url or space.storage_url
    parsed = _parse_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        # Several local workers on one SQLite file: wait for the lock rather than dying of 'database is locked'.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=space.study.heartbeat_interval_s,
            grace_period=space.study.grace_period_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=space.study.max_retry),
        )
    except Exception as err:
        raise StudyError(f"storage {safe_url(url)}: cannot open: {_reason(err)}") from None


def existing_study(storage: RDBStorage, name: str) -> optuna.Study | None:
    names = {s.study_name for s in storage.get_all_studies()}
    return optuna.load_study(study_name=name, storage=storage) if name in names else None


def open_study(space: Space, storage: RDBStorage, seed_offset: int = 0,
               log: Callable[[str], None] = print) -> optuna.Study:
    """Create the study (and enqueue the presets) or resume it; refuses, writing nothing, a study created from a
    different space. Safe when several workers start at once: only the one that creates the study enqueues."""
    name = space.study.name
    found = existing_study(storage, name)
    if found is not None:
        _check_same_space(found, space, storage)
    existing = len(found.trials) if found is not None else 0
    options = {
        "study_name": name,
        "storage": storage,
        "sampler": make_sampler(space, _base_seed(space) + existing + seed_offset),  # a resume does not replay draws
        "pruner": make_pruner(space),
    }
    try:
        study = optuna.create_study(**options, directions=_directions(space))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**options)
        _check_same_space(study, space, storage)
        return study
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("space_source", space.source)
    study.set_user_attr("space", space.raw)
    study.set_user_attr("objective", [OBJECTIVE] + ([space.study.second_objective] if space.multi_objective else []))
    if space.multi_objective:
        study.set_metric_names([OBJECTIVE, space.study.second_objective])
    enqueue_presets(study, space, log)
    return study


def _directions(space: Space) -> list[str]:
    return ["maximize", "minimize"] if space.multi_objective else ["maximize"]


def _check_same_space(study: optuna.Study, space: Space, storage: RDBStorage) -> None:
    fingerprint = study.user_attrs.get("space_fingerprint")
    if fingerprint is None and not study.trials:
        return  # another worker has just created it and is writing its attributes
    if fingerprint != space.fingerprint():
        raise StudyError(
            f"study {space.study.name!r} in {safe_url(storage.url)} was created from a different space "
            f"({study.user_attrs.get('space_source', 'not by ackd-search')}); use a new study.name or the "
            "original space file"
        )


def _base_seed(space: Space) -> int:
    return int(space.base.get("seed", 0))


def enqueue_presets(study: optuna.Study, space: Space, log: Callable[[str], None] = print) -> None:
    """The reference ACKD point (our reconstruction) and plain KD run first, so the search never ends worse."""
    if not space.study.presets or study.trials:
        return
    methods = _method_choices(space)
    for preset in ("reference", "kd"):
        wanted = "ackd" if preset == "reference" else "kd"
        if wanted not in methods:
            log(f"preset {preset!r} skipped: distill.method {wanted!r} is not in this space")
            continue
        values, outside = space.preset_values(preset)
        if "distill.method" in {p.path for p in space.params}:
            values["distill.method"] = wanted
        study.enqueue_trial(values, user_attrs={"preset": preset, "preset_sampled": outside}, skip_if_exists=True)
        if outside:
            log(f"preset {preset!r}: {', '.join(outside)} outside this space's ranges, left to the sampler")


def _method_choices(space: Space) -> list[str]:
    param = next((p for p in space.params if p.path == "distill.method"), None)
    return list(param.choices) if param else [space.base.get("distill", {}).get("method", "ackd")]


def preflight(space: Space, log: Callable[[str], None] = print) -> None:
    """Read the data and get the teacher once, before the study is touched: a missing data folder or a broken
    teacher checkpoint is one error instead of a failure in every trial, and a teacher trained here is cached
    for all of them."""
    from ackd_search.teachers import cache_entry, get_teacher, read_manifest
    from ackd_search.trainer import get_splits, resolve_device

    cfg = space.run_config(space.default_values())
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError([f"{space.source}: run.device: {err}"]) from None
    splits = get_splits(cfg.data)
    if _method_choices(space) == ["student"]:
        return
    if not cfg.teacher.checkpoint and read_manifest(cache_entry(cfg)) is None:
        log(f"training the teacher {cfg.teacher.arch} on {cfg.data.name} once ({cfg.teacher.optim.epochs} epochs); "
            f"every trial reads it from {cfg.teacher.cache_dir}")
    teacher, info = get_teacher(cfg, splits, device)
    del teacher
    where = info.get("cache_entry") or info.get("checkpoint")
    log(f"teacher {cfg.teacher.arch}: val_acc {info['val_acc']:.2f} ({where})")


# --- the objective -----------------------------------------------------------------------------------------------


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


def requeue_interrupted(study: optuna.Study, log: Callable[[str], None] = print) -> None:
    """Trials stopped by Ctrl-C/SIGTERM are FAIL (honest); running the command again re-runs their parameters."""
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state != TrialState.FAIL or not trial.user_attrs.get("interrupted"):
            continue
        root = trial.user_attrs.get("retry_of", trial.number)
        if any(t.user_attrs.get("retry_of") == root and t.number > trial.number for t in trials):
            continue  # already re-queued
        study.enqueue_trial(trial.params, user_attrs={"retry_of": root})
        log(f"trial {trial.number} was interrupted: re-queued to resume from its last epoch checkpoint")


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
    }


def compact_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("epoch", "val_acc", "val_loss", "lr", "images_per_s")
    return [{**{k: h[k] for k in keep}, "terms": {k: round(v, 6) for k, v in h["terms"].items()}} for h in history]


class OptunaReporter:
    """Per-epoch hook for `train`: report, store the curve and loss terms, and prune through the trial."""

    def __init__(self, trial: optuna.Trial, can_prune: bool, progress: Progress | None = None):
        self.trial, self.can_prune, self.progress = trial, can_prune, progress
        self.history: list[dict[str, Any]] = []

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if metrics.get("resumed"):  # restored from the epoch checkpoint of an interrupted or killed run
            self.trial.set_user_attr("resumed_from_epoch", epoch)
        self.trial.set_user_attr("history", compact_history(self.history))
        if self.progress is not None:
            self.progress.epoch(self.trial.number, epoch, metrics)
        if self.can_prune:
            self.trial.report(metrics["val_acc"], epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.2f})")


def objective_values(space: Space, result: RunResult) -> float | tuple[float, float]:
    if not space.multi_objective:
        return result.final_val_acc
    second = result.student_flops if space.study.second_objective == "student_flops" else result.student_params
    return result.final_val_acc, float(second)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def trial_objective(space: Space, paths: StudyPaths, progress: Progress | None = None):
    """The objective for `study.optimize`: sample a config, train it, record everything about it."""

    def objective(trial: optuna.Trial):
        values = space.suggest(trial)
        run_dir = paths.runs / f"trial-{root_trial_number(trial):05d}"
        cfg = space.run_config(values, output_dir=str(run_dir))
        trial.set_user_attr("config", to_dict(cfg))
        if progress is not None:
            progress.start(trial.number, values)
        reporter = OptunaReporter(trial, can_prune=not space.multi_objective, progress=progress)
        try:
            result = train(cfg, reporter)
        except NonFiniteLossError as err:
            trial.set_user_attr("fail_reason", one_line(err))
            if space.multi_objective:
                raise
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned:
            upload_curve(trial, reporter.history, run_dir, paths)
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as err:  # out of memory, a broken config, ...: this trial fails alone
            trial.set_user_attr("fail_reason", one_line(err))
            write_traceback(run_dir)
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        for key, value in trial_attrs(result).items():
            trial.set_user_attr(key, value)
        upload_curve(trial, reporter.history, run_dir, paths)
        upload_best_weights(trial, space, result.final_val_acc, run_dir, paths)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing left to resume
        return objective_values(space, result)

    return objective


def write_traceback(run_dir: Path) -> None:
    """The whole traceback of a failed trial goes to its run folder; the study keeps the one-line reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.log").write_text(traceback.format_exc())


def quiet_optuna() -> None:
    """Our progress lines report every trial (failures with their reason and error.log); Optuna's own per-trial
    log lines and experimental-feature warnings would repeat them."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def artifact_store(paths: StudyPaths) -> FileSystemArtifactStore:
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(paths.artifacts))


def upload_curve(trial: optuna.Trial, history: list[dict], run_dir: Path, paths: StudyPaths) -> None:
    if not history:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = run_dir / "curve.json"
    curve.write_text(json.dumps(compact_history(history), indent=1))
    upload_artifact(artifact_store=artifact_store(paths), file_path=str(curve), study_or_trial=trial,
                    mimetype="application/json")


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


# --- progress and summary ----------------------------------------------------------------------------------------


class Progress:
    """Terminal progress: one line per finished trial; the running trial's epoch on a live line when on a tty."""

    def __init__(self, space: Space, stream=None, prefix: str = ""):
        self.space, self.stream, self.prefix = space, stream or sys.stdout, prefix
        self.live = self.stream.isatty()
        self.started: dict[int, float] = {}
        self.epochs = int(space.base.get("optim", {}).get("epochs", 0))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def start(self, number: int, values: dict[str, Any]) -> None:
        self.started[number] = time.perf_counter()

    def epoch(self, number: int, epoch: int, metrics: dict[str, Any]) -> None:
        if self.live:
            total = f"/{self.epochs}" if self.epochs else ""
            self._write(f"\r{self.prefix}  trial {number}: epoch {epoch}{total}  val_acc {metrics['val_acc']:6.2f}   ")

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        counts = state_counts(study)
        elapsed = time.perf_counter() - self.started.pop(trial.number, time.perf_counter())
        value = "" if trial.values is None else "value " + ", ".join(f"{v:.4g}" for v in trial.values)
        reason = trial.user_attrs.get("fail_reason", "")
        preset = trial.user_attrs.get("preset")
        best = best_text(study)
        line = (f"trial {trial.number:>3} {trial.state.name:<8} {value:<18} {elapsed:6.1f}s"
                f"{' [' + preset + ']' if preset else ''}{'  ' + reason if reason else ''}"
                f" | done {counts['COMPLETE']} pruned {counts['PRUNED']} failed {counts['FAIL']} | {best}")
        self._write(("\r" if self.live else "") + self.prefix + line + "\n")


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


def best_text(study: optuna.Study) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet"
    if len(study.directions) > 1:
        return f"Pareto front: {len(study.best_trials)} trials"
    best = study.best_trial
    return f"best #{best.number} {best.value:.2f}"


def summary(study: optuna.Study, top: int = 5) -> str:
    """The closing table: counts, the best trials (or the Pareto front), and parameter importances."""
    counts = state_counts(study)
    lines = [f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "\n".join(lines + ["no complete trial"])
    multi = len(study.directions) > 1
    chosen = sorted(study.best_trials, key=lambda t: -t.values[0]) if multi else sorted(
        complete, key=lambda t: -t.value)[:top]
    lines.append("Pareto front (val_acc ↑, cost ↓):" if multi else f"top {len(chosen)} trials by {OBJECTIVE}:")
    lines.append(f"  {'#':>4} {'val_acc':>8} {'params':>9} {'MFLOPs':>9} {'time_s':>7}  preset")
    for t in chosen:
        a = t.user_attrs
        lines.append(f"  {t.number:>4} {t.values[0]:>8.2f} {a.get('student_params', 0):>9,} "
                     f"{a.get('student_flops', 0) / 1e6:>9.2f} {a.get('wall_time_s', math.nan):>7.1f}  "
                     f"{a.get('preset', '')}")
    if not multi:
        best = study.best_trial
        lines.append(f"best trial #{best.number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
    lines += importance_lines(study, complete)
    return "\n".join(lines)


def importance_lines(study: optuna.Study, complete: list[FrozenTrial], minimum: int = 5) -> list[str]:
    if len(study.directions) > 1 or len(complete) < minimum:
        return [f"(parameter importances need >= {minimum} complete trials of a single-objective study)"]
    try:
        with warnings.catch_warnings():  # "few trials in a regime": the ranking below is all we claim
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except Exception as err:  # e.g. every parameter constant so far
        return [f"(parameter importances unavailable: {one_line(err)})"]
    ranked = list(importances.items())[:8]
    return ["parameter importances (PED-ANOVA):"] + [f"  {v:6.3f}  {k}" for k, v in ranked]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- the loop ------------------------------------------------------------------------------------------------------


def run_search(space: Space, n_trials: int | None = None, timeout_s: float | None = None,
               storage_url: str | None = None, seed_offset: int = 0, stream=None, tag: str = "",
               requeue: bool = True) -> optuna.Study:
    """Check the storage, data and teacher, open or resume the study (presets enqueued on creation), and run
    trials until `n_trials` / `timeout_s`."""
    prefix = f"[{tag}] " if tag else ""
    log = lambda text: print(prefix + text, file=stream or sys.stdout, flush=True)  # noqa: E731
    url = storage_url or space.storage_url
    check_storage(url)
    preflight(space, log)
    storage = make_storage(space, url)
    study = open_study(space, storage, seed_offset, log)
    if requeue:
        requeue_interrupted(study, log)
    paths = StudyPaths.for_space(space)
    progress = Progress(space, stream, prefix)
    n_trials = n_trials if n_trials is not None else space.study.n_trials
    timeout_s = timeout_s if timeout_s is not None else space.study.timeout_s
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    log(f"study {space.study.name!r} in {safe_url(storage.url)}: {finished} trials finished so far; "
        f"running {n_trials if n_trials else 'unlimited'} more{f' for up to {timeout_s:.0f}s' if timeout_s else ''} "
        f"(pid {os.getpid()}, ackd-search {__version__})")
    study.optimize(
        trial_objective(space, paths, progress),
        n_trials=n_trials,
        timeout=timeout_s,
        catch=(Exception,),
        callbacks=[progress.trial_done],
        gc_after_trial=True,
    )
    return study
