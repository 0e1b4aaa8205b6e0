"""The Ray Tune backend: the same space, `train()` and Optuna study as `backends.local.run_search`, with trials spread
over a Ray cluster, stopped early by ASHA or by the study's own pruner, and stored with their true state and curve."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import optuna
import ray
from optuna.storages import RDBStorage
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from ackd_search import __version__
from ackd_search.backends.local import logger
from ackd_search.backends.ray_search import PrunerScheduler, StudySearch, fail_stale
from ackd_search.backends.ray_trainable import train_trial
from ackd_search.config import from_dict
from ackd_search.errors import StudyError, one_line
from ackd_search.searching.preflight import preflight
from ackd_search.searching.record import FINISHED, OBJECTIVE, StudyPaths
from ackd_search.searching.samplers import PRUNER_DEFAULTS, make_pruner
from ackd_search.searching.settings import RayOptions
from ackd_search.searching.space import Space
from ackd_search.searching.storage import check_storage, make_storage, safe_url
from ackd_search.searching.study import open_study, requeue_interrupted, run_confirmation
from ackd_search.view.hooks import UserView

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

    log, view = logger(stream), UserView(space, stream)

    url = storage_url or space.storage_url
    check_storage(url)
    preflight(space, log, view.teacher_progress)  # data and teacher once, before trials run side by side
    storage = make_storage(space, url)
    study = open_study(space, storage, seed_offset, log)
    requeue_interrupted(study, log)
    n_trials = n_trials if n_trials is not None else space.study.n_trials
    timeout_s = timeout_s if timeout_s is not None else space.study.timeout_s
    if n_trials == 0:
        return study
    connected = init_ray(address)
    try:
        _tune(space, study, storage, options, kind, n_trials, timeout_s, view, log)
    finally:
        if connected:
            ray.shutdown()
    study = optuna.load_study(study_name=space.study.name, storage=storage)
    if confirm:  # the confirmation runs are few and sequential: the plain backend, in this process
        run_confirmation(space, study, view, log)
    return study


def _tune(space: Space, study: optuna.Study, storage: RDBStorage, options: RayOptions, kind: Scheduler,
          n_trials: int | None, timeout_s: float | None, view: UserView, log: Callable[[str], None]) -> None:
    root = Path.cwd()
    paths = absolute_study_paths(space, root)
    options = options.for_cluster(ray.cluster_resources())
    searcher = StudySearch(space, study, storage, paths, view, timeout_s, root)
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
