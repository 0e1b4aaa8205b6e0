"""The confirmation phase: the sibling study `<study>-confirm` opened or created, the missing runs queued once (under
a lock, whatever the number of processes), the queued runs trained until none is left (never a new search trial),
and the winner's line written on the search study, where the dashboard shows it beside its best trial."""

from __future__ import annotations

import gc
import os
import secrets
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ackd_search.files import locked
from ackd_search.searching.compare import Confirmed, confirmed, winner_line
from ackd_search.searching.confirm import (
    confirmation_runs,
    enqueue_confirmation,
    min_seeds,
    waiting_confirmations,
)
from ackd_search.searching.hooks import QUIET, SearchHooks
from ackd_search.searching.objective import trial_objective
from ackd_search.searching.record import (
    CONFIRMS,
    CONFIRMS_STUDY,
    OBJECTIVE,
    WINNER_ATTR,
    StudyPaths,
    confirm_study_name,
    is_interrupted,
)
from ackd_search.searching.space import Space
from ackd_search.searching.storage import existing_study
from ackd_search.searching.study import open_existing_study, requeue_interrupted
from ackd_search.searching.trial_loop import fail_stale, run_trial, tell

CONFIRM_ATTR = "confirmation study"


def open_confirmation(space: Space, search: optuna.Study, create: bool = True) -> optuna.Study | None:
    """The sibling study holding `search`'s confirmation runs (created when asked and missing; None otherwise)."""
    name, storage = confirm_study_name(search.study_name), search._storage
    found = existing_study(storage, name)
    if found is not None or not create:
        return found
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    pruner=optuna.pruners.NopPruner())
    except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago
        return optuna.load_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner())
    study.set_user_attr(CONFIRMS_STUDY, search.study_name)
    study.set_metric_names([OBJECTIVE])  # the dashboard's axis reads val_acc, not "Objective 0"
    study.set_user_attr("study_uid", secrets.token_hex(8))  # its run folders and checkpoints belong to it
    study.set_user_attr("space_fingerprint", search.user_attrs.get("space_fingerprint"))
    search.set_user_attr(CONFIRM_ATTR, name)
    return study


def interrupted_here(space: Space, storage_url: str | None = None) -> list[str]:
    """What this process left interrupted (trials it marked `interrupted`, with its pid), in the search study and
    its confirmation, as `search trial #5` / `confirmation run #3 (kd, seed 2)`."""
    search = open_existing_study(space, storage_url)
    found = []
    for study in (search, open_confirmation_if_any(search)):
        for t in study.get_trials(deepcopy=False) if study is not None else []:
            if is_interrupted(t) and t.user_attrs.get("pid") == os.getpid():
                found.append(f"confirmation run #{t.number} ({t.user_attrs[CONFIRMS]}, seed "
                             f"{t.user_attrs.get('confirm_seed')})" if CONFIRMS in t.user_attrs
                             else f"search trial #{t.number}")
    return found


def confirmation_paths(space: Space) -> StudyPaths:
    return StudyPaths.for_space(space).for_confirmation()


def run_confirmation(space: Space, search: optuna.Study, hooks: SearchHooks = QUIET,
                     log: Callable[[str], None] = print) -> optuna.Study:
    """Queue the confirmation runs still missing and run every waiting one (resumes an interrupted confirmation);
    only confirmation runs, and it stops when none is left. Returns the sibling study."""
    confirm = open_confirmation(space, search)
    paths = confirmation_paths(space)
    with locked(paths.runs / "queue.lock"):
        requeue_interrupted(confirm, log)
        enqueue_confirmation(space, search, confirm, log)
    run_queued(space, confirm, search, hooks, paths)
    record_winner(space, search, confirm)
    hooks.confirmation_done(search, confirm)
    return confirm


def confirmation_results(search: optuna.Study, paths: StudyPaths) -> list[Confirmed]:
    """The confirmed configurations of `search` (its sibling's runs and any it kept itself), read only;
    `paths`' artifacts hold their per-image records."""
    confirm = open_confirmation_if_any(search)
    return confirmed(confirmation_runs(search, confirm), paths)


def open_confirmation_if_any(search: optuna.Study) -> optuna.Study | None:
    return existing_study(search._storage, confirm_study_name(search.study_name))


def record_winner(space: Space, search: optuna.Study, confirm: optuna.Study | None) -> None:
    results = confirmed(confirmation_runs(search, confirm), confirmation_paths(space))
    if results:
        search.set_user_attr(WINNER_ATTR, winner_line(results, min_seeds(space)))


def _duplicate_of(trial: FrozenTrial, runs: list[FrozenTrial]) -> FrozenTrial | None:
    """Another live or finished run of the same configuration and seed (two processes queued it at once)."""
    mine = (trial.user_attrs.get("confirm_key"), trial.user_attrs.get("confirm_seed"))
    return next((t for t in runs if t.number != trial.number and t.state in (TrialState.COMPLETE, TrialState.RUNNING)
                 and not is_interrupted(t) and (t.user_attrs.get("confirm_key"), t.user_attrs.get("confirm_seed"))
                 == mine and t.number < trial.number), None)


def run_queued(space: Space, confirm: optuna.Study, search: optuna.Study, hooks: SearchHooks = QUIET,
               paths: StudyPaths | None = None) -> None:
    """Train `confirm`'s waiting runs one by one until none is left. It claims only WAITING trials (Optuna's own
    atomic claim, as `ask` does), so it never creates a trial: any number of processes may run it on one study."""
    objective = trial_objective(space, paths or confirmation_paths(space), hooks, search_study=search)
    hooks.phase_started(confirm, waiting_confirmations(confirm), None)
    while True:
        fail_stale(confirm)  # a killed process's run becomes FAIL and is re-queued
        trial_id = confirm._pop_waiting_trial_id()
        if trial_id is None:
            return
        trial = optuna.Trial(confirm, trial_id)
        frozen = confirm._storage.get_trial(trial_id)
        twin = _duplicate_of(frozen, confirmation_runs(search, confirm)) if CONFIRMS in frozen.user_attrs else None
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin.number)
            ended = tell(confirm, trial, TrialState.PRUNED, None)
        else:
            ended = run_trial(confirm, trial, objective)  # told as the search's trials are (trial_loop)
        hooks.trial_finished(confirm, ended)
        gc.collect()
