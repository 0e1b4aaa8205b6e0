"""The loop of trials: each one claimed, run with heartbeats and told, as Optuna's `study.optimize` does, without
its two ways of dying of a storage error (an `UnboundLocalError` when tell and its read-back both fail, `Should not
reach` when the read-back finds the trial still RUNNING). A storage outage past its limit stops the loop with the
trial untold (RUNNING, its checkpoint kept: the next run resumes it); a trial another process took over is left
to it. Re-runs of an earlier trial do not count against `n_trials`."""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState

from ackd_search.errors import one_line
from ackd_search.searching.hooks import SearchHooks
from ackd_search.searching.record import root_trial_number
from ackd_search.searching.resilient import StorageOutage
from ackd_search.training.checkpoints import NotOwner

Objective = Callable[[optuna.Trial], object]


def is_rerun(trial: FrozenTrial) -> bool:
    """A re-run of an earlier trial (after a kill, a lost machine, Ctrl-C): it resumes that trial's budget."""
    return root_trial_number(trial) != trial.number


def fail_stale(study: optuna.Study) -> None:
    """RUNNING trials whose process stopped beating become FAIL and are re-queued (resuming their checkpoint)."""
    if is_heartbeat_enabled(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)


def rerun_is_next(study: optuna.Study) -> bool:
    """Whether the trial `ask` takes next (the oldest waiting one) re-runs an earlier trial."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return bool(waiting) and is_rerun(min(waiting, key=lambda t: t.number))


def run_trials(study: optuna.Study, objective: Objective, hooks: SearchHooks, n_trials: int | None = None,
               timeout_s: float | None = None) -> None:
    """Ask, run and tell trials until `n_trials` new ones ran (re-runs are free: one queued next still runs) or
    `timeout_s` passed."""
    started, new = time.monotonic(), 0
    try:
        while True:
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                break
            fail_stale(study)
            if n_trials is not None and new >= n_trials and not rerun_is_next(study):
                break
            with warnings.catch_warnings():  # this loop beats for its trials, as optimize() would
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask()
            rerun = is_rerun(study._storage.get_trial(trial._trial_id))
            ended = run_trial(study, trial, objective)
            new += not rerun
            hooks.trial_finished(study, ended)
            gc.collect()
    finally:
        study._storage.remove_session()


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> FrozenTrial:
    """`objective(trial)` with heartbeats, then its end told: its value, PRUNED, or FAIL (alone). Ctrl-C is told
    FAIL and raised; StorageOutage is raised untold; a trial taken over by another process (NotOwner) is left to it."""
    value, state, interrupt = None, None, None
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except NotOwner as err:
            return _taken_over(study, trial, err)
        except StorageOutage:
            raise
        except KeyboardInterrupt as err:
            state, interrupt = TrialState.FAIL, err
        except Exception:
            state = TrialState.FAIL
    try:
        ended = tell(study, trial, state, value)
    except NotOwner as err:
        ended = _taken_over(study, trial, err)
    else:
        told = getattr(objective, "told", None)
        if told is not None:
            told(ended)
    if interrupt is not None:
        raise interrupt
    return ended


def tell(study: optuna.Study, trial: optuna.Trial, state: TrialState | None, value) -> FrozenTrial:
    """Store the trial's end (state None: COMPLETE with `value`, or FAIL when it is not a number). A write retried
    after its commit was lost in flight finds the trial already ended as asked: that is success. Ended otherwise
    (another process failed it as stale meanwhile): NotOwner."""
    storage = study._storage
    if storage.get_trial(trial._trial_id).state.is_finished():
        raise NotOwner("it was failed by another process (its heartbeat was older than study.grace_period_s)")
    try:
        _tell_with_warning(study, trial, value_or_values=value, state=state, suppress_warning=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        ended = storage.get_trial(trial._trial_id)
        wanted = state or TrialState.COMPLETE
        if ended.state != wanted:
            raise NotOwner(f"it was ended {ended.state.name} by another process") from None
    return storage.get_trial(trial._trial_id)


def _taken_over(study: optuna.Study, trial: optuna.Trial, err: NotOwner) -> FrozenTrial:
    """This process stops working on `trial` and writes nothing more in its folder. A trial still RUNNING (its
    folder taken, its state not yet changed) is failed with the reason; one already ended keeps its record."""
    frozen = study._storage.get_trial(trial._trial_id)
    if not frozen.state.is_finished():
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", one_line(err))
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        frozen = study._storage.get_trial(trial._trial_id)
    return frozen
