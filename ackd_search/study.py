"""The Optuna study: open or create it (presets enqueued once, race-free), the sampler seed of each process, the
pre-flight checks, and the search loop followed by the confirmation of its candidates over seeds."""

from __future__ import annotations

import os
import secrets
import sys
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ackd_search import __version__
from ackd_search.config import ConfigError
from ackd_search.objective import OBJECTIVE, REQUEUE_KEEPS, StudyPaths, root_trial_number, trial_objective
from ackd_search.progress import Progress, summary  # noqa: F401 (summary: callers import it here)
from ackd_search.space import Space, make_pruner, make_sampler
from ackd_search.storage import StudyError, check_storage, existing_study, make_storage, safe_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
__all__ = ["FINISHED", "StudyError", "check_storage", "make_storage", "open_study", "run_search"]


def open_study(space: Space, storage: RDBStorage, seed_offset: int = 0,
               log: Callable[[str], None] = print) -> optuna.Study:
    """Create the study (and enqueue the presets) or join it; refuses, writing nothing, a study created from a
    different space. Safe when any number of processes start at once: one creates, the others join.

    The process that creates the study samples with the space's seed (a fresh single-process search is
    reproducible); every process that joins or resumes it draws a random seed, logged, so two workers, or two
    machines started with the same command, never replay each other's draws."""
    name = space.study.name
    found = existing_study(storage, name)
    if found is not None:
        _check_same_space(found, space, storage)
    options = {"study_name": name, "storage": storage, "pruner": make_pruner(space)}
    created = False
    if found is None:
        seed = _base_seed(space) + seed_offset
        try:
            study = optuna.create_study(**options, sampler=make_sampler(space, seed), directions=_directions(space))
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    if not created:
        seed = secrets.randbits(31)
        study = optuna.load_study(**options, sampler=make_sampler(space, seed))
        _check_same_space(study, space, storage)
    study.sampler_seed = seed  # read by the objective, which stores it with each trial
    log(f"{'created' if created else 'joined'} study {name!r}; sampler {space.study.sampler.get('name')} seed {seed}")
    if not created:
        return study
    study.set_user_attr("study_uid", secrets.token_hex(8))  # run folders and checkpoints belong to this study
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("space_source", space.source)
    study.set_user_attr("space", space.raw)
    study.set_user_attr("objective", [OBJECTIVE] + ([space.study.second_objective] if space.multi_objective else []))
    study.set_metric_names([OBJECTIVE] + ([space.study.second_objective] if space.multi_objective else []))
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
    if not space.study.presets:
        return  # only the creator calls this; skip_if_exists keeps a point from being queued twice
    methods = _method_choices(space)
    for preset in ("reference", "kd"):
        wanted = "ackd" if preset == "reference" else "kd"
        if wanted not in methods:
            baseline = preset in getattr(space.study.confirm, "presets", ())
            log(f"preset {preset!r}: distill.method {wanted!r} is not searched in this space"
                + ("; the confirmation stage trains it as a baseline" if baseline else "; not run"))
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



def requeue_interrupted(study: optuna.Study, log: Callable[[str], None] = print) -> None:
    """Trials stopped by Ctrl-C/SIGTERM are FAIL (honest); running the command again re-runs their parameters with
    their labels (preset, confirmation) and their original's run folder, so they resume from the last checkpoint."""
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state != TrialState.FAIL or not trial.user_attrs.get("interrupted"):
            continue
        root = root_trial_number(trial)
        if any(root_trial_number(t) == root and t.number > trial.number for t in trials):
            continue  # already re-queued (or re-run by a heartbeat retry)
        labels = {k: v for k, v in trial.user_attrs.items() if k in REQUEUE_KEEPS}
        study.enqueue_trial(trial.params, user_attrs={**labels, "retry_of": root})
        log(f"trial {trial.number} was interrupted: re-queued to resume from its last epoch checkpoint")


def quiet_optuna() -> None:
    """Our progress lines report every trial (failures with their reason and error.log); Optuna's own per-trial
    log lines and experimental-feature warnings would repeat them."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)



def run_search(space: Space, n_trials: int | None = None, timeout_s: float | None = None,
               storage_url: str | None = None, seed_offset: int = 0, stream=None, tag: str = "",
               requeue: bool = True, confirm: bool = True) -> optuna.Study:
    """Check the storage, data and teacher, open or resume the study (presets enqueued on creation), run trials
    until `n_trials` / `timeout_s`, then (`confirm`) retrain the candidates over seeds."""
    log = _logger(stream, tag)
    url = storage_url or space.storage_url
    check_storage(url)
    preflight(space, log)
    storage = make_storage(space, url)
    study = open_study(space, storage, seed_offset, log)
    if requeue:
        requeue_interrupted(study, log)
    say_running(space, study, log)
    n_trials = n_trials if n_trials is not None else space.study.n_trials
    timeout_s = timeout_s if timeout_s is not None else space.study.timeout_s
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    log(f"study {space.study.name!r} in {safe_url(storage.url)}: {finished} trials finished so far; "
        f"running {n_trials if n_trials else 'unlimited'} more{f' for up to {timeout_s:.0f}s' if timeout_s else ''} "
        f"(pid {os.getpid()}, ackd-search {__version__})")
    _optimize(space, study, stream, tag, n_trials=n_trials, timeout=timeout_s)
    if confirm:
        run_confirmation(space, study, stream, tag)
    return study


def say_running(space: Space, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Trials RUNNING now belong to another process, or to one that was killed (SIGKILL, a lost machine): say
    so, and when a killed one's trial is failed and re-run from its checkpoint."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        numbers = ", ".join(f"#{t.number}" for t in running)
        log(f"trials RUNNING: {numbers}: in another process, or left by a killed one; a killed one's trial is "
            f"marked FAIL and re-run from its last checkpoint once its heartbeat is {space.study.grace_period_s} s "
            "old (study.grace_period_s)")


def _logger(stream=None, tag: str = "") -> Callable[[str], None]:
    prefix = f"[{tag}] " if tag else ""
    return lambda text: print(prefix + text, file=stream or sys.stdout, flush=True)


def _optimize(space: Space, study: optuna.Study, stream=None, tag: str = "", **limits) -> None:
    progress = Progress(space, stream, f"[{tag}] " if tag else "", study=study, total=limits.get("n_trials"),
                        timeout_s=limits.get("timeout"))
    objective = trial_objective(space, StudyPaths.for_space(space), progress,
                                sampler_seed=getattr(study, "sampler_seed", None))
    study.optimize(objective, catch=(Exception,), callbacks=[progress.trial_done], gc_after_trial=True, **limits)


def run_confirmation(space: Space, study: optuna.Study, stream=None, tag: str = "") -> None:
    """Queue the confirmation runs still missing and run every waiting one (resumes an interrupted confirmation)."""
    from ackd_search.confirm import enqueue_confirmation, waiting_confirmations
    from ackd_search.notes import annotate_study

    enqueue_confirmation(space, study, _logger(stream, tag))
    while waiting_confirmations(study) > 0:
        # Optuna runs waiting trials in order: a search trial queued earlier (a preset the search had no budget
        # for, a re-queued one) runs before the confirmation runs, which then still all run.
        before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        _optimize(space, study, stream, tag, n_trials=before)
        if len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) >= before:
            break  # nothing was taken (another process holds them): leave them to it
    annotate_study(study)  # the dashboard's study note: search trials, confirmation runs and the table


def confirm_study(space: Space, storage_url: str | None = None, stream=None) -> optuna.Study:
    """`search.py confirm`: the confirmation stage alone, on an existing study."""
    log = _logger(stream)
    url = storage_url or space.storage_url
    check_storage(url)
    storage = make_storage(space, url)
    if existing_study(storage, space.study.name) is None:
        raise StudyError(f"no study {space.study.name!r} in {safe_url(url)}; run the search first")
    preflight(space, log)
    study = open_study(space, storage, log=log)
    requeue_interrupted(study, log)
    run_confirmation(space, study, stream)
    return study
