"""An RDB storage that waits out a database outage: every call Optuna or we make (trials' attributes, reports,
tell, heartbeats, notes, artifacts' metadata) is retried with backoff while the server restarts, drops its
connections or cannot write, for up to `study.storage_outage_s`; the outage is said in one line. Past that the call
raises `StorageOutage` (one line), and the search stops with its trials' checkpoints in place for the next run."""

from __future__ import annotations

import functools
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy
from optuna.storages import RDBStorage

from ackd_search.errors import StudyError, one_line
from ackd_search.notices import notice

DEFAULT_OUTAGE_S = 120.0  # study.storage_outage_s: a database restart or a failover takes well under this
FIRST_DELAY_S, MAX_DELAY_S = 0.25, 5.0  # backoff between attempts of one call
# An OperationalError that no wait mends: the schema or the statement is wrong, not the connection.
PERMANENT = re.compile(r"no such (table|column)|syntax error|unknown column|doesn't exist|does not exist", re.I)
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError,
             sqlalchemy.exc.PendingRollbackError, sqlite3.OperationalError)
T = TypeVar("T")


class StorageOutage(StudyError):
    """The storage stayed unreachable or unwritable past `study.storage_outage_s`: the search stops here."""


def is_transient(err: BaseException) -> bool:
    """A connection that broke or could not be made, or a database that cannot write now (restart, failover, full
    disk, a lock held too long): worth waiting for. Optuna wraps SQLAlchemy's error in StorageInternalError."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, TRANSIENT):
            return not PERMANENT.search(str(err))
        err = err.__cause__ or err.__context__
    return False


class Outage:
    """What one process knows of the storage's state, shared by its threads: since when calls fail, whether its
    line was said, and whether this process has already given up waiting (then each call tries once)."""

    def __init__(self, url: str, limit_s: float, say: Callable[[str], None]):
        self.url, self.limit_s, self.say = url, limit_s, say
        self.lock = threading.Lock()
        self.since: float | None = None
        self.gave_up = False

    def failed(self, err: BaseException, attempt: int) -> float:
        """Seconds to wait before the next attempt of a call that failed with `err`; StorageOutage past the limit."""
        with self.lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                self.say(f"storage {self.url} unreachable ({one_line(err, 160)}); waiting up to "
                         f"{self.limit_s:.0f} s for it (study.storage_outage_s), then carrying on")
            waited = now - self.since
            if self.gave_up or waited >= self.limit_s:
                self.gave_up = True
                raise StorageOutage(
                    f"storage {self.url}: unreachable or unwritable for {waited:.0f} s ({one_line(err, 160)}); "
                    "the search stops here: run it again once the storage is back, and the trials left RUNNING "
                    "resume from their last checkpoints") from None
            left = self.limit_s - waited
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** attempt) * random.uniform(0.7, 1.3)
        return max(0.0, min(delay, left))

    def ended(self) -> None:
        if self.since is not None:  # unlocked read: the common case (no outage) costs nothing
            with self.lock:
                self.since, self.gave_up = None, False


def _retrying(method):
    @functools.wraps(method)
    def call(self: ResilientStorage, *args, **kwargs):
        return self.call(functools.partial(method, self, *args, **kwargs))

    return call


# Every call of RDBStorage that reaches the database, the private ones Optuna's cache calls directly included.
CALLS = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
         "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
         "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
         "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
         "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
         "get_trial", "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial", "_get_best_trial_id",
         "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "_get_stale_trial_ids")


class ResilientStorage(RDBStorage):
    """RDBStorage whose calls wait out an outage (see the module). A write retried after its commit was lost in
    flight may find itself already done: a state already set raises UpdateFinishedTrialError, which the trial loop
    reads back (`trial_loop.tell`)."""

    def __init__(self, url: str, *args: Any, outage_s: float = DEFAULT_OUTAGE_S, shown_url: str = "",
                 say: Callable[[str], None] = notice, **kwargs: Any):
        self.outage = Outage(shown_url or url, outage_s, say)
        self._depth = threading.local()  # a call made inside a retried call is not retried twice
        super().__init__(url, *args, **kwargs)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()`, retried while the storage is away (also for our own statements on `self.engine`)."""
        depth = getattr(self._depth, "n", 0)
        if depth:
            return fn()
        attempt = 0
        while True:
            self._depth.n = 1
            try:
                result = fn()
            except Exception as err:
                if not is_transient(err):
                    raise
                delay = self.outage.failed(err, attempt)
                self.scoped_session.remove()  # a session whose connection died is not reused
                time.sleep(delay)
                attempt += 1
                continue
            finally:
                self._depth.n = 0
            self.outage.ended()
            return result

    def record_heartbeat(self, trial_id: int) -> None:
        """One attempt, never an error: the heartbeat thread beats again in `heartbeat_interval_s`, and an exception
        there would only print a thread's traceback. A missed beat matters after `grace_period_s` only."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as err:
            if not is_transient(err):
                raise
            try:
                self.outage.failed(err, 0)
            except StorageOutage:
                pass
            self.scoped_session.remove()
            return
        self.outage.ended()

    def __reduce__(self):
        # Pickled (a Ray callback, a Tune experiment file), the URL and its password would be written to disk.
        raise TypeError("the study storage is not pickled: it holds the storage URL")


for _name in CALLS:
    setattr(ResilientStorage, _name, _retrying(getattr(RDBStorage, _name)))
