"""The Ray Tune backend: the same space, `train()` and Optuna study as `study.run_search`, with trials spread over a
Ray cluster, stopped early by ASHA or by the study's own pruner, and stored with their true state and whole curve."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import optuna
import ray
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ackd_search import __version__
from ackd_search.config import RunConfig, from_dict, to_dict, with_absolute_paths
from ackd_search.objective import (
    OBJECTIVE,
    StudyPaths,
    compact_history,
    one_line,
    root_trial_number,
    set_aside_foreign_checkpoint,
    trial_attrs,
    trial_identity,
    upload_best_weights,
    upload_config,
    upload_curve,
    write_traceback,
)
from ackd_search.progress import Progress
from ackd_search.runner import run_training
from ackd_search.space import PRUNER_DEFAULTS, RayOptions, Space, make_pruner
from ackd_search.storage import StudyError, check_storage, make_storage, safe_url
from ackd_search.study import FINISHED, open_study, preflight, requeue_interrupted, run_confirmation
from ackd_search.trainer import CHECKPOINT, NonFiniteLossError

OUTCOME = "ackd_outcome"  # key of a trial's last report: how it ended, as JSON (Tune flattens nested dicts)
Scheduler = Literal["asha", "pruner", "fifo"]


def resolve_ray_options(space: Space, **overrides: Any) -> RayOptions:
    """The space's `study.ray`, with keyword overrides (None keeps the file's value); checked like the file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    allowed = [f.name for f in dataclasses.fields(RayOptions)]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise StudyError(f"ray option {unknown[0]!r} is unknown; allowed: {', '.join(allowed)}")
    data = {**dataclasses.asdict(space.study.ray), **given}
    return from_dict(RayOptions, data, source=f"{space.source}: study.ray")


# --- paths -------------------------------------------------------------------------------------------------------


def absolute_study_paths(space: Space, root: Path) -> StudyPaths:
    paths = StudyPaths.for_space(space)
    return StudyPaths(runs=Path(os.path.abspath(root / paths.runs)),
                      artifacts=Path(os.path.abspath(root / paths.artifacts)))


# --- the trainable (runs on a Ray worker; never touches the study) ------------------------------------------------


class TuneReporter:
    """`train`'s per-epoch hook on a worker. Every epoch goes to Tune at once except the last, which waits for the run's
    result: a scheduler may stop a trial at any report, so the final report must carry everything the study keeps."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.last: dict[str, Any] = {"epoch": 0, OBJECTIVE: math.nan}

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        keep = ("val_loss", "lr", "images_per_s", "train_s")
        self.last = {"epoch": epoch, OBJECTIVE: metrics["val_acc"], **{k: metrics[k] for k in keep},
                     "terms": dict(metrics["terms"])}
        if epoch < self.epochs:
            tune.report(dict(self.last))

    def finish(self, outcome: dict[str, Any]) -> None:
        tune.report({**self.last, OUTCOME: json.dumps(outcome)})


def train_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: the plain backend's `train(cfg, reporter)`; a failure is reported, not raised, because Ray
    would retry a raised error and a bad config fails the same way every time (a dead worker is still retried)."""
    if "error" in config:  # the driver could not build this trial's run config
        TuneReporter(0).finish({"state": "fail", "fail_reason": config["error"]})
        return
    cfg = from_dict(RunConfig, json.loads(config["run_config"]), source=f"trial {config['optuna_trial']}")
    run_dir = Path(cfg.output_dir)
    reporter = TuneReporter(cfg.optim.epochs)
    try:
        result = run_training(cfg, reporter, identity=config.get("identity"))
    except Exception as err:
        if not isinstance(err, NonFiniteLossError):
            write_traceback(run_dir)
        reporter.finish({"state": "fail", "fail_reason": one_line(err),
                         "nonfinite": isinstance(err, NonFiniteLossError)})
        return
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing left to resume
    reporter.finish({"state": "complete", "final_val_acc": result.final_val_acc, "attrs": trial_attrs(result),
                     "history": compact_history(result.history)})


def _history_row(result: dict[str, Any]) -> dict[str, Any]:
    """One epoch of a (flattened) Tune result, in `compact_history`'s shape."""
    terms = {key.split("/", 1)[1]: value for key, value in result.items() if key.startswith("terms/")}
    return {"epoch": int(result["epoch"]), "val_acc": result[OBJECTIVE], "val_loss": result["val_loss"],
            "lr": result["lr"], "images_per_s": result["images_per_s"], "terms": terms}


# --- the searcher (runs on the driver; the only writer to the study) ----------------------------------------------


class StudySearch(OptunaSearch):
    """OptunaSearch over our study, keeping what plain OptunaSearch drops: every epoch (the last included) as an
    intermediate value, the true end state (PRUNED when a scheduler stopped it, FAIL with a reason), attrs and
    artifacts."""

    def __init__(self, space: Space, study: optuna.Study, storage: RDBStorage, paths: StudyPaths, progress: Progress,
                 timeout_s: float | None = None, root: Path | None = None):
        self.space, self.paths, self.progress = space, paths, progress
        self.root = root or Path.cwd()
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self._history: dict[str, dict[int, dict[str, Any]]] = {}
        self._run_dirs: dict[str, Path] = {}
        # Tune sees one metric; the study's own directions (one or two objectives) decide what is stored.
        super().__init__(space=space.suggest, metric=OBJECTIVE, mode="max", sampler=study.sampler,
                         study_name=study.study_name, storage=storage)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # --- asking ---------------------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return Searcher.FINISHED  # like Optuna's timeout: start nothing new, let running trials finish
        self.heartbeat()  # ours are fresh, so only trials of dead workers or drivers count as stale
        fail_stale(self.study)
        with warnings.catch_warnings():  # heartbeats come from this driver (see `heartbeat`), not from optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            super().suggest(trial_id)  # asks (enqueued presets and retries first) and samples through space.suggest
        ot_trial = self._ot_trials[trial_id]
        values = dict(ot_trial.params)
        run_dir = self.paths.runs / f"trial-{root_trial_number(ot_trial):05d}"
        self._run_dirs[trial_id] = run_dir
        self.heartbeat([trial_id])
        self.progress.start(ot_trial.number, values)
        config: dict[str, Any] = {"optuna_trial": ot_trial.number}
        try:
            # Ray workers run in their own folders (maybe on other machines): every relative path is resolved here,
            # against the driver's folder, so the files land where the plain backend puts them.
            cfg = self.space.run_config(values, output_dir=str(run_dir))
            cfg = from_dict(RunConfig, with_absolute_paths(to_dict(cfg), self.root), source=self.space.source)
        except Exception as err:
            config["error"] = one_line(err)
            return config
        upload_config(ot_trial, cfg, run_dir, self.paths)
        set_aside_foreign_checkpoint(ot_trial, run_dir, trial_identity(ot_trial, root_trial_number(ot_trial)))
        config["run_config"] = json.dumps(to_dict(cfg))
        config["identity"] = trial_identity(ot_trial, root_trial_number(ot_trial))
        return config

    # --- per-epoch results ----------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.record(trial_id, result)

    def record(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Store a reported epoch as an intermediate value (the whole curve is an artifact at the end); False when
        not a new epoch."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return False
        epoch = int(result.get("epoch", 0))
        history = self._history.setdefault(trial_id, {})
        if epoch < 1 or epoch in history:  # epoch 0: failed before any epoch; repeats: Tune's closing duplicate
            return False
        history[epoch] = _history_row(result)
        storage_id = self._ot_trials[trial_id]._trial_id
        # Through the storage: `Trial.report` refuses multi-objective studies, but their curves are worth keeping.
        self.study._storage.set_trial_intermediate_value(storage_id, epoch, float(result[OBJECTIVE]))
        return True

    def curve(self, trial_id: str) -> list[dict[str, Any]]:
        history = self._history.get(trial_id, {})
        return compact_history([history[epoch] for epoch in sorted(history)])

    def should_prune(self, trial_id: str, pruner: optuna.pruners.BasePruner) -> bool:
        ot_trial = self._ot_trials[trial_id]
        return pruner.prune(self.study, self.study._storage.get_trial(ot_trial._trial_id))

    # --- the end of a trial ---------------------------------------------------------------------------------
    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials or error:
            return  # an error is told by `fail`, which the callback calls next with the reason
        if not result:
            self.fail(trial_id, "stopped by Ray Tune before it reported an epoch", interrupted=True)
            return
        try:
            self.record(trial_id, result)  # the report that made a scheduler stop the trial reaches only here
            outcome = json.loads(result[OUTCOME]) if OUTCOME in result else None
            if outcome is None:
                self._finish_pruned(trial_id)
            elif outcome["state"] == "complete":
                self._finish_complete(trial_id, outcome)
            elif outcome.get("nonfinite") and not self.space.multi_objective:
                self._finish_pruned(trial_id, outcome["fail_reason"])  # as the plain backend: diverged = pruned
            else:
                self.fail(trial_id, outcome["fail_reason"])
        except Exception as err:
            self.fail(trial_id, f"recording the result failed: {one_line(err)}")

    def _finish_complete(self, trial_id: str, outcome: dict[str, Any]) -> None:
        ot_trial, run_dir = self._ot_trials[trial_id], self._run_dirs[trial_id]
        attrs = outcome["attrs"]
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        upload_curve(ot_trial, outcome["history"], run_dir, self.paths)
        upload_best_weights(ot_trial, self.space, outcome["final_val_acc"], run_dir, self.paths)
        values: float | list[float] = outcome["final_val_acc"]
        if self.space.multi_objective:
            values = [outcome["final_val_acc"], float(attrs[self.space.study.second_objective])]
        self._tell(trial_id, TrialState.COMPLETE, values)

    def _finish_pruned(self, trial_id: str, reason: str | None = None) -> None:
        ot_trial, run_dir = self._ot_trials[trial_id], self._run_dirs[trial_id]
        ot_trial.set_user_attr("prune_reason", reason or f"stopped by the Ray scheduler after epoch "
                               f"{max(self._history.get(trial_id, {0: None}))}")
        if reason:
            ot_trial.set_user_attr("fail_reason", reason)
        upload_curve(ot_trial, self.curve(trial_id), run_dir, self.paths)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the worker waits in `tune.report` until stopped: no race
        self._tell(trial_id, TrialState.PRUNED)

    def fail(self, trial_id: str, reason: str, interrupted: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            ot_trial.set_user_attr("fail_reason", reason)
            if interrupted:  # `requeue_interrupted` re-runs it next time, resuming its checkpoint
                ot_trial.set_user_attr("interrupted", True)
        self._tell(trial_id, TrialState.FAIL)

    def fail_unfinished(self, reason: str) -> None:
        """After the Tune run: no trial of ours may stay RUNNING in the study (Ctrl-C, a stopped run, ...)."""
        for trial_id in list(self._ot_trials):
            self.fail(trial_id, reason, interrupted=True)

    def _tell(self, trial_id: str, state: TrialState, values: float | list[float] | None = None) -> None:
        ot_trial = self._ot_trials[trial_id]
        try:
            self.study.tell(ot_trial, values, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # already failed as stale by another process
            self._completed_trials.add(trial_id)
            return
        self._completed_trials.add(trial_id)
        self.progress.trial_done(self.study, self.study._storage.get_trial(ot_trial._trial_id))

    def heartbeat(self, trial_ids: list[str] | None = None) -> None:
        """Heartbeats of our running trials, from the driver: a SIGKILLed driver's trials go stale and are retried."""
        storage = self.study._storage
        if not is_heartbeat_enabled(storage):
            return
        for trial_id in trial_ids if trial_ids is not None else list(self._ot_trials):
            if trial_id not in self._completed_trials:
                storage.record_heartbeat(self._ot_trials[trial_id]._trial_id)

    def save(self, checkpoint_path: str) -> None:
        """The study is this searcher's durable state; running the command again resumes it (no Tune restore)."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("resume a Ray search by running the same command again; the study holds its state")


def fail_stale(study: optuna.Study) -> None:
    """RUNNING trials whose worker or driver stopped beating become FAIL and are retried as new trials (resuming
    the dead trial's checkpoint), as `optimize()` does before every trial of the plain backend."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


# --- schedulers and callbacks ------------------------------------------------------------------------------------


class PrunerScheduler(FIFOScheduler):
    """A Tune scheduler that asks the study's own Optuna pruner after every epoch, so a Ray search prunes with the
    same rule (median, percentile, ...) and warm-up as the plain backend."""

    def __init__(self, searcher: StudySearch, pruner: optuna.pruners.BasePruner):
        super().__init__()
        self.searcher, self.pruner = searcher, pruner

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        new_epoch = self.searcher.record(trial.trial_id, result)
        if new_epoch and OUTCOME not in result and self.searcher.should_prune(trial.trial_id, self.pruner):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def budget_epochs(space: Space) -> int:
    """The most epochs a trial of this space trains (the largest when `optim.epochs` is searched)."""
    param = next((p for p in space.params if p.path == "optim.epochs"), None)
    if param is None:
        return space.run_config({}).optim.epochs
    return int(max(param.choices) if param.kind == "categorical" else param.high)


def scheduler_kind(space: Space, options: RayOptions) -> Scheduler:
    """The study's own pruner by default (`pruner`: the same rule, warm-up and keep rate as the plain backend; ASHA's
    default would stop the bottom 75 % at every rung), fifo when the study cannot prune; asha when asked for."""
    can_prune = space.study.pruner["name"] != "none" and not space.multi_objective
    kind = options.scheduler or ("pruner" if can_prune else "fifo")
    if kind != "fifo" and space.multi_objective:
        raise StudyError(f"{space.source}: study.ray.scheduler: {kind!r} stops trials early, but a study with "
                         "second_objective cannot prune; allowed: fifo")
    return kind


def make_scheduler(kind: Scheduler, space: Space, options: RayOptions, searcher: StudySearch) -> TrialScheduler:
    if kind == "fifo":
        return FIFOScheduler()
    if kind == "pruner":
        return PrunerScheduler(searcher, make_pruner(space))
    pruner = {**PRUNER_DEFAULTS.get(space.study.pruner["name"], {}), **space.study.pruner}
    max_t = budget_epochs(space)
    warmup = pruner.get("n_warmup_steps", pruner.get("min_resource", 1))
    grace = options.grace_period or (warmup if isinstance(warmup, int) else 1)
    factor = options.reduction_factor or pruner.get("reduction_factor", 4)
    # time_attr "epoch", not training_iteration: a retried trial replays its restored epochs, so they stay equal.
    return AsyncHyperBandScheduler(time_attr="epoch", metric=OBJECTIVE, mode="max", max_t=max_t,
                                   grace_period=min(max(1, grace), max_t), reduction_factor=factor)


class StudyCallback(tune.Callback):
    """Driver-side hooks: heartbeats for the study's running trials, and the reason a Ray trial errored."""

    def __init__(self, searcher: StudySearch, heartbeat_interval_s: float):
        self.searcher, self.interval_s, self.last_beat = searcher, heartbeat_interval_s, 0.0

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if time.monotonic() - self.last_beat >= self.interval_s:
            self.searcher.heartbeat()
            self.last_beat = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.searcher.fail(trial.trial_id, _error_reason(trial))


def _error_reason(trial: Trial) -> str:
    """One line for a trial Ray could not finish (its worker died, most often); our own errors never get here."""
    try:  # Tune pickles the error on the driver just before `on_trial_error`
        error = ray.cloudpickle.loads(Path(trial.pickled_error_file).read_bytes())
    except Exception:
        return "the Ray trial failed (see error.txt in its Tune folder)"
    cause = getattr(error, "cause", None) or error
    return f"Ray: {one_line(cause)}"


# --- the loop ----------------------------------------------------------------------------------------------------


# Tune turns Ctrl-C into a quiet stop; we keep KeyboardInterrupt, as in the plain backend, so the interrupted trials
# are told FAIL (interrupted) and the command exits 130. Tune's own tables would repeat our one line per trial.
TUNE_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}


@contextlib.contextmanager
def _tune_env() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tune_logger.setLevel(level)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_ray(address: str | None) -> bool:
    """Join `address` (auto | host:port) or start a local Ray; True when this call connected (so we shut down)."""
    if address and address.startswith("ray://"):
        # Ray Client would run Tune, and so this searcher, on the cluster's head, away from the study's files and
        # this terminal; it also needs grpcio, which ray[tune] does not install.
        raise StudyError(f"--address {address}: Ray Client (ray://) is not supported; run search.py on a node of the "
                         "cluster with --address auto (for example through `ray job submit`)")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


def run_ray_search(space: Space, n_trials: int | None = None, storage_url: str | None = None,
                   address: str | None = None, stream=None, *, timeout_s: float | None = None, seed_offset: int = 0,
                   confirm: bool = True, **ray_options: Any) -> optuna.Study:
    """Open or resume the study, enqueue the presets, and run `n_trials` more trials under Ray Tune.

    `ray_options` override `RayOptions` (cpus_per_trial, gpus_per_trial, max_concurrent, scheduler, ...)."""
    options = resolve_ray_options(space, **ray_options)
    kind = scheduler_kind(space, options)

    def log(text: str) -> None:
        print(text, file=stream or sys.stdout, flush=True)

    url = storage_url or space.storage_url
    check_storage(url)
    preflight(space, log)  # data read and teacher trained once, here, before trials run side by side
    storage = make_storage(space, url)
    study = open_study(space, storage, seed_offset, log)
    requeue_interrupted(study, log)
    n_trials = n_trials if n_trials is not None else space.study.n_trials
    timeout_s = timeout_s if timeout_s is not None else space.study.timeout_s
    if n_trials == 0:
        return study
    connected = init_ray(address)
    try:
        _tune(space, study, storage, options, kind, n_trials, timeout_s, stream, log)
    finally:
        if connected:
            ray.shutdown()
    study = optuna.load_study(study_name=space.study.name, storage=storage)
    if confirm:  # the confirmation runs are few and sequential: the plain backend, in this process
        run_confirmation(space, study, stream)
    return study


def _tune(space: Space, study: optuna.Study, storage: RDBStorage, options: RayOptions, kind: Scheduler,
          n_trials: int | None, timeout_s: float | None, stream, log: Callable[[str], None]) -> None:
    root = Path.cwd()
    paths = absolute_study_paths(space, root)
    options = options.for_cluster(ray.cluster_resources())
    searcher = StudySearch(space, study, storage, paths, Progress(space, stream), timeout_s, root)
    scheduler = make_scheduler(kind, space, options, searcher)
    resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(train_trial, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=n_trials or -1,
            max_concurrent_trials=options.max_concurrent, reuse_actors=True,
            trial_dirname_creator=lambda trial: f"trial-{trial.config.get('optuna_trial', 0):05d}-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=time.strftime("%Y%m%d-%H%M%S"), storage_path=str(paths.runs.parent / f"{space.study.name}-tune"),
            verbose=0, failure_config=tune.FailureConfig(max_failures=_max_failures(space, options)),
            callbacks=[StudyCallback(searcher, space.study.heartbeat_interval_s)],
        ),
    )
    fail_stale(study)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    log(f"study {space.study.name!r} in {safe_url(storage.url)}: {finished} trials finished so far; running "
        f"{n_trials if n_trials else 'unlimited'} more{f' for up to {timeout_s:.0f}s' if timeout_s else ''} on Ray "
        f"({resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial, up to {options.max_concurrent} at once, "
        f"scheduler {kind}; pid {os.getpid()}, ackd-search {__version__})")
    try:
        with _tune_env():
            tuner.fit()
    except KeyboardInterrupt:
        searcher.fail_unfinished("interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as err:
        searcher.fail_unfinished(f"the Ray Tune run stopped: {one_line(err)}")
        raise
    searcher.fail_unfinished("left unfinished by Ray Tune")


def _max_failures(space: Space, options: RayOptions) -> int:
    return space.study.max_retry if options.max_failures is None else options.max_failures
