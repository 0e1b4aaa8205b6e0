"""The Ray Tune backend: the same space, `train()` and Optuna study as `backends.local.run_search`, with trials spread
over a Ray cluster, stopped early by ASHA or by the study's own pruner, and stored with their true state and curve."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
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
from ackd_search.backends.ray_output import without_ray_dumps
from ackd_search.backends.ray_search import PrunerScheduler, StudySearch
from ackd_search.backends.ray_trainable import NODE, train_trial
from ackd_search.config import from_dict
from ackd_search.errors import StudyError, one_line
from ackd_search.searching.confirming import run_confirmation
from ackd_search.searching.preflight import preflight
from ackd_search.searching.record import FINISHED, OBJECTIVE, StudyPaths
from ackd_search.searching.samplers import PRUNER_DEFAULTS, make_pruner
from ackd_search.searching.settings import RayOptions
from ackd_search.searching.space import Space
from ackd_search.searching.storage import check_storage, make_storage, safe_url
from ackd_search.searching.study import open_study, requeue_interrupted
from ackd_search.searching.trial_loop import fail_stale
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
    """Driver-side hooks: heartbeats for the study's running trials, and what Ray did to a trial: each attempt's
    start and node, an attempt lost with its worker or node (kept on the trial; one line per lost node), a trial
    Ray gave up on (FAIL with its reason, and queued again to resume from its checkpoint)."""

    def __init__(self, searcher: StudySearch, heartbeat_interval_s: float, log: Callable[[str], None],
                 max_retry: int = 2):
        self.searcher, self.interval_s, self.last_beat, self.log = searcher, heartbeat_interval_s, 0.0, log
        self.max_retry = max_retry
        self.attempt_started: dict[str, float] = {}
        self.node_of: dict[str, tuple[str, str]] = {}  # Tune trial id -> (node id, node ip) of its latest report
        self.nodes_lost: set[str] = set()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if time.monotonic() - self.last_beat >= self.interval_s:
            self.searcher.heartbeat()
            self.last_beat = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.attempt_started[trial.trial_id] = time.monotonic()  # also each restart after a lost attempt

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self.node_of[trial.trial_id] = (str(result.get(NODE) or ""), str(result.get("node_ip") or ""))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        where, why = self._lost(trial)
        attempt = self.searcher.attempt_lost(trial.trial_id, f"{where}: {why}", self._attempt_s(trial))
        node = self.node_of.get(trial.trial_id, ("", ""))[0] or why
        if node not in self.nodes_lost:  # one line per lost node, however many trials it ran
            self.nodes_lost.add(node)
            self.log(f"Ray: trial #{trial.config.get('optuna_trial', '?')} lost {where} ({why}); Ray retries its "
                     f"trials from their last checkpoints (attempt {attempt + 1} of at most "
                     f"{trial.max_failures + 1})")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        where, why = self._lost(trial)
        self.searcher.attempt_lost(trial.trial_id, f"{where}: {why}", self._attempt_s(trial))
        self.searcher.fail(trial.trial_id, f"Ray lost {where} on every attempt ({why}); queued again to resume "
                                           "from its last checkpoint")
        # Ray spends its retries in a second on a dead node's cached worker: the study's own retry still stands.
        rerun = self.searcher.requeue(trial.trial_id, self.max_retry)
        if rerun is not None:
            self.log(f"Ray: trial #{trial.config.get('optuna_trial', '?')} failed on every attempt ({why}); "
                     f"queued again as trial #{rerun}")

    def _attempt_s(self, trial: Trial) -> float:
        return time.monotonic() - self.attempt_started.pop(trial.trial_id, time.monotonic())

    def _lost(self, trial: Trial) -> tuple[str, str]:
        """What was lost (`its worker on node 1a2b3c4d (10.0.0.2)`) and why, in a line each."""
        node, ip = self.node_of.get(trial.trial_id, ("", ""))
        alive = _node_alive(node)
        place = f"node {node[:8]}" + (f" ({ip})" if ip else "") if node else (f"node {ip}" if ip else "")
        where = f"its {place}" if alive is False and place else f"its worker on {place}" if place else "its worker"
        return where, read_failure(trial)

    def __reduce__(self):
        # Tune pickles its callbacks into the experiment folder: the searcher (the study storage) stays out.
        return (_NoCallback, ())


class _NoCallback(tune.Callback):
    """What Tune's experiment files hold in place of the study callback."""


def _node_alive(node_id: str) -> bool | None:
    """Whether Ray still counts node `node_id` alive (None: unknown); the GCS marks a dead node within seconds."""
    if not node_id:
        return None
    try:
        return next((bool(n.get("Alive")) for n in ray.nodes() if n.get("NodeID") == node_id), None)
    except Exception:
        return None


def read_failure(trial: Trial) -> str:
    """Why Ray lost `trial`'s latest attempt, in one line, from the `error.txt` Tune writes in its trial folder (read
    as text: nothing in the study's folders is ever unpickled)."""
    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (TypeError, OSError):
        return "no error.txt in its Tune folder"
    last = text.rsplit("Failure # ", 1)[-1]
    lines = [line.strip() for line in last.splitlines()[1:] if line.strip()]
    why = next((line for line in lines if re.search(r"because|died|killed|lost|unavailable", line, re.I)),
               lines[0] if lines else "no reason given")
    why = re.sub(r"^The actor [0-9a-f]+ is unavailable: ", "", why)
    return why.split(" The task may or may not", 1)[0][:200]


# --- the loop ----------------------------------------------------------------------------------------------------


# Tune turns Ctrl-C into a quiet stop; we keep KeyboardInterrupt, as in the plain backend, so the interrupted trials
# are told FAIL (interrupted) and the command exits 130. Tune's own tables would repeat our one line per trial.
# A trial Ray loses is one line of ours (StudyCallback), not Tune's traceback of it.
TUNE_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}


@contextlib.contextmanager
def _tune_env() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    # Tune's own lines about a trial it could not finish repeat ours (StudyCallback); what stops the run is raised.
    tune_logger.setLevel(logging.CRITICAL)
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
    # Filtered from joining to leaving: a lost node's dump can reach the driver until Ray is shut down (a Ray
    # session the caller started goes on printing to the caller's streams after this returns).
    with without_ray_dumps():
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
    searcher = StudySearch(space, study, storage, paths, view, timeout_s, root, n_trials=n_trials)
    scheduler = make_scheduler(kind, space, options, searcher)
    resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(train_trial, resources),
        tune_config=tune.TuneConfig(
            # Unbounded: the searcher ends the run after `n_trials` new trials, re-runs of earlier ones not counted.
            search_alg=searcher, scheduler=scheduler, num_samples=-1,
            max_concurrent_trials=options.max_concurrent, reuse_actors=True,
            trial_dirname_creator=lambda trial: f"trial-{trial.config.get('optuna_trial', 0):05d}-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=time.strftime("%Y%m%d-%H%M%S"), storage_path=str(paths.runs.parent / f"{space.study.name}-tune"),
            verbose=0, failure_config=tune.FailureConfig(max_failures=_max_failures(space, options)),
            callbacks=[StudyCallback(searcher, space.study.heartbeat_interval_s, log, space.study.max_retry)],
        ),
    )
    fail_stale(study)
    view.phase_started(study, n_trials, timeout_s)  # "trial k/N" counts this run's N, not the space's n_trials
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
