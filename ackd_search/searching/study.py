"""The Optuna study: open or create it (presets enqueued once, race-free) or open an existing one read-only, the
sampler seed of each process, interrupted trials re-queued, and the two phases of trials: the search and the
confirmation of its candidates over seeds."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ackd_search.errors import StudyError
from ackd_search.searching.hooks import QUIET, SearchHooks
from ackd_search.searching.objective import trial_objective
from ackd_search.searching.record import (
    OBJECTIVE,
    REQUEUE_KEEPS,
    WINNER_ATTR,
    StudyPaths,
    is_interrupted,
    root_trial_number,
)
from ackd_search.searching.samplers import make_pruner, make_sampler
from ackd_search.searching.space import Space
from ackd_search.searching.storage import (
    existing_study,
    make_storage,
    redacted,
    safe_url,
    sqlite_path,
    storage_url_of,
)
from ackd_search.searching.trial_loop import run_trials


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
    # First, so the dashboard lists it first beside its Best Trial; the confirmation fills it in.
    study.set_user_attr(WINNER_ATTR, "not confirmed yet: the confirmation over seeds runs after the search")
    study.set_user_attr("study_uid", secrets.token_hex(8))  # run folders and checkpoints belong to this study
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("space_source", space.source)
    # The whole space, as a record (not among the attributes the dashboard tabulates), its password masked.
    storage.set_study_system_attr(study._study_id, "space", redacted(space.raw))
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
    """The reference ACKD point (our reconstruction), plain KD and DKD run first, so the search never ends worse:
    each where the space can hold it (KD when it searches the method, DKD when it also searches the form)."""
    if not space.study.presets:
        return  # only the creator calls this; skip_if_exists keeps a point from being queued twice
    methods = space.methods()
    form = next((p for p in space.params if p.path == "distill.form"), None)
    for preset in ("reference", "kd", "dkd"):
        wanted = "ackd" if preset == "reference" else "kd"
        if preset == "dkd" and wanted in methods and (form is None or "dkd" not in form.choices):
            continue  # the form is fixed: the confirmation's dkd baseline stands in
        if wanted not in methods:
            baseline = preset in getattr(space.study.confirm, "presets", ())
            log(f"preset {preset!r}: distill.method {wanted!r} is not searched in this space"
                + ("; the confirmation stage trains it as a baseline" if baseline else "; not run"))
            continue
        values, outside = space.preset_values(preset)
        if "distill.method" in {p.path for p in space.params}:
            values["distill.method"] = wanted
        if preset == "dkd":
            values["distill.form"] = "dkd"
        study.enqueue_trial(values, user_attrs={"preset": preset, "preset_sampled": outside}, skip_if_exists=True)
        if outside:
            log(f"preset {preset!r}: {', '.join(outside)} outside this space's ranges, left to the sampler")



def requeue_interrupted(study: optuna.Study, log: Callable[[str], None] = print) -> None:
    """Trials stopped by Ctrl-C/SIGTERM are FAIL (honest); running the command again re-runs their parameters with
    their labels (preset, confirmation) and their original's run folder, so they resume from the last checkpoint."""
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if not is_interrupted(trial):
            continue
        root = root_trial_number(trial)
        if any(root_trial_number(t) == root and t.number > trial.number for t in trials):
            continue  # already re-queued (or re-run by a heartbeat retry)
        labels = {k: v for k, v in trial.user_attrs.items() if k in REQUEUE_KEEPS}
        study.enqueue_trial(trial.params, user_attrs={**labels, "retry_of": root})
        log(f"trial {trial.number} was interrupted: re-queued to resume from its last epoch checkpoint")


def rerun_later(study: optuna.Study, trial: FrozenTrial, max_retry: int) -> int | None:
    """Queue `trial`'s parameters again, as a re-run of its original (labels kept, its run folder and checkpoint
    resumed), unless that original was re-run `max_retry` times already. Returns the new trial's number."""
    root = root_trial_number(trial)
    trials = study.get_trials(deepcopy=False)
    if sum(root_trial_number(t) == root and t.number != root for t in trials) >= max_retry:
        return None
    labels = {k: v for k, v in trial.user_attrs.items() if k in REQUEUE_KEEPS}
    study.enqueue_trial(trial.params, user_attrs={**labels, "retry_of": root})
    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max((t.number for t in queued if t.user_attrs.get("retry_of") == root), default=None)


def quiet_optuna() -> None:
    """Our progress lines report every trial (failures with their reason and error.log); Optuna's own per-trial
    log lines and experimental-feature warnings would repeat them."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)



def say_running(space: Space, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Trials RUNNING now belong to another process, or to one that was killed (SIGKILL, a lost machine): say
    so, and when a killed one's trial is failed and re-run from its checkpoint."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        numbers = ", ".join(f"#{t.number}" for t in running)
        log(f"trials RUNNING: {numbers}: in another process, or left by a killed one; a killed one's trial is "
            f"marked FAIL and re-run from its last checkpoint once its heartbeat is {space.study.grace_period_s} s "
            "old (study.grace_period_s)")


def optimize(space: Space, study: optuna.Study, hooks: SearchHooks = QUIET, n_trials: int | None = None,
             timeout_s: float | None = None) -> None:
    """Run `n_trials` new trials (re-runs of earlier ones come free) or until `timeout_s`, each one failing alone;
    `hooks` watch them. A storage outage past `study.storage_outage_s` stops it (StorageOutage, one line)."""
    hooks.phase_started(study, n_trials, timeout_s)
    objective = trial_objective(space, StudyPaths.for_space(space), hooks,
                                sampler_seed=getattr(study, "sampler_seed", None))
    run_trials(study, objective, hooks, n_trials=n_trials, timeout_s=timeout_s)


def open_existing_study(space: Space, storage_url: str | None = None) -> optuna.Study:
    """The space's study, to read: an SQLite file that is not there is reported, never created empty."""
    url = storage_url_of(space, storage_url)
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise StudyError(f"no study {space.study.name!r}: {db} does not exist; run the search first")
    storage = make_storage(space, url)
    study = existing_study(storage, space.study.name)
    if study is None:
        raise StudyError(f"no study {space.study.name!r} in {safe_url(storage.url)}; run the search first")
    return study


