"""The plain backend: a search in this process, read top to bottom. Check the storage, read the data and get the
teacher once, open the study, run trials, confirm the candidates over seeds; the caller summarises."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import optuna

from ackd_search import __version__
from ackd_search.errors import StudyError
from ackd_search.searching.confirming import run_confirmation
from ackd_search.searching.preflight import preflight
from ackd_search.searching.record import FINISHED
from ackd_search.searching.space import Space
from ackd_search.searching.storage import check_storage, existing_study, make_storage, safe_url, storage_url_of
from ackd_search.searching.study import open_study, optimize, requeue_interrupted, say_running
from ackd_search.view.hooks import UserView


def logger(stream=None, tag: str = "") -> Callable[[str], None]:
    prefix = f"[{tag}] " if tag else ""
    return lambda text: print(prefix + text, file=stream or sys.stdout, flush=True)


def run_search(space: Space, n_trials: int | None = None, timeout_s: float | None = None,
               storage_url: str | None = None, seed_offset: int = 0, stream=None, tag: str = "",
               requeue: bool = True, confirm: bool = True) -> optuna.Study:
    """Check the storage, data and teacher, open or resume the study (presets enqueued on creation), run trials
    until `n_trials` / `timeout_s`, then (`confirm`) retrain the candidates over seeds."""
    log, view = logger(stream, tag), UserView(space, stream, tag)
    url = storage_url_of(space, storage_url)
    check_storage(url)
    preflight(space, log, view.teacher_progress)
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
    optimize(space, study, view, n_trials=n_trials, timeout_s=timeout_s)
    if confirm:
        run_confirmation(space, study, view, log)
    return study


def confirm_study(space: Space, storage_url: str | None = None, stream=None) -> optuna.Study:
    """`search.py confirm`: the confirmation stage alone, on an existing study."""
    log, view = logger(stream), UserView(space, stream)
    url = storage_url or space.storage_url
    check_storage(url)
    storage = make_storage(space, url)
    if existing_study(storage, space.study.name) is None:
        raise StudyError(f"no study {space.study.name!r} in {safe_url(url)}; run the search first")
    preflight(space, log, view.teacher_progress)
    study = open_study(space, storage, log=log)  # interrupted search trials wait for the next search
    run_confirmation(space, study, view, log)
    return study
