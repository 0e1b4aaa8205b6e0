"""Study storage: URL parsing and masking, checks that find a bad database before any work is done, and an
RDB storage (heartbeats + retry, outages waited out: `resilient`) that any number of processes can create and use
at the same moment."""

from __future__ import annotations

import copy
import json
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models

from ackd_search.errors import StudyError
from ackd_search.searching.record import root_trial_number
from ackd_search.searching.resilient import DEFAULT_OUTAGE_S, ResilientStorage
from ackd_search.searching.space import Space

CREATE_ATTEMPTS = 8  # simultaneous starters on a new database race to create its schema; the losers retry
CONNECT_TIMEOUT_S = 10  # a server that does not answer (a dropped route, not a refusal) fails a connection this fast


# How a `--workers` parent hands its worker processes `--storage`: in their environment (readable by their user
# only), never on their command lines, which every user of the machine can read (`ps`, /proc/<pid>/cmdline).
WORKER_STORAGE_ENV = "_ACKD_SEARCH_WORKER_STORAGE"


def storage_url_of(space: Space, storage_url: str | None = None) -> str:
    """`storage_url`, else the one this worker's parent handed it in its environment, else the space's."""
    return storage_url or os.environ.get(WORKER_STORAGE_ENV) or space.storage_url


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def redacted(raw: Any) -> Any:
    """A space file's plain data with the storage URL's password masked, for a record that is stored or shown."""
    if not isinstance(raw, dict):
        return raw
    study = raw.get("study")
    if isinstance(study, dict) and isinstance(study.get("storage"), str):
        return {**raw, "study": {**study, "storage": safe_url(study["storage"])}}
    return raw


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


def sqlite_path(url: str) -> Path | None:
    """The database file of a file-based SQLite URL, else None."""
    parsed = _parse_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _check_sqlite(url: str, path: Path) -> None:
    """Readable, a database, and writable (a write lock taken and released); a new file's folder is writable."""
    if not path.exists():
        try:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as err:
            raise StudyError(f"storage {url}: cannot create the database in {path.parent}: {err.strerror}") from None
        return
    if path.is_dir():
        raise StudyError(f"storage {url}: {path} is a folder, not a database file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30, isolation_level=None)
    except sqlite3.Error as err:
        raise StudyError(f"storage {url}: cannot open {path} for writing: {err}") from None
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # 'file is not a database' for a corrupt file
        conn.execute("BEGIN IMMEDIATE")  # 'attempt to write a readonly database' for a read-only one
        conn.execute("ROLLBACK")
    except sqlite3.Error as err:
        raise StudyError(f"storage {url}: {path} is not a usable SQLite database: {err}") from None
    finally:
        conn.close()


def check_storage(url: str) -> None:
    """Reach the database (SQLite: read it and take a write lock) before a teacher is trained or a table made."""
    parsed = _parse_url(url)
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite(safe_url(url), path)
        return
    if parsed.get_backend_name() == "sqlite":
        return  # in-memory
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:
        raise StudyError(f"storage {safe_url(url)}: cannot connect: {_reason(err)}") from None


def _serialise_sqlite(engine: sqlalchemy.Engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE). pysqlite's deferred
    transactions let two processes both read a WAITING trial and both mark it RUNNING (SQLite ignores SELECT ...
    FOR UPDATE); with the lock taken first, Optuna's read-check-write of a trial's state is atomic."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made during the schema check reconnect with the listeners


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose process stopped beating (it re-runs the parameters as a new trial, which
    resumes the dead one's checkpoint), plus the reason on the trial it failed, which Optuna leaves blank."""

    def __init__(self, max_retry: int, grace_period_s: int):
        super().__init__(max_retry=max_retry)
        self.grace_period_s = grace_period_s

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = (f"its process stopped beating for over {self.grace_period_s} s (killed, stopped, or its machine "
                  "lost); re-run as a new trial from its last checkpoint")
        annotate_finished(study, trial, "fail_reason", reason)
        # The re-run says what it resumes (`retry_of`, as a re-queued interrupted trial does): the progress line,
        # the dashboard and `root_trial_number` read it.
        relabelled = copy.deepcopy(trial)
        relabelled.user_attrs = {**trial.user_attrs, "retry_of": root_trial_number(trial)}
        super().__call__(study, relabelled)


def annotate_finished(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value: Any) -> None:
    """A user attribute on a trial that is already finished: Optuna's API refuses any write to such a trial, so
    this one row goes through the storage's own engine and table."""
    storage = getattr(study._storage, "_backend", study._storage)
    if not isinstance(storage, RDBStorage):
        return
    table = models.TrialUserAttributeModel.__table__

    def write() -> None:
        with storage.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.trial_id == trial._trial_id, table.c.key == key))
            conn.execute(table.insert().values(trial_id=trial._trial_id, key=key, value_json=json.dumps(value)))

    storage.call(write) if isinstance(storage, ResilientStorage) else write()


def outage_limit_s(space: Space) -> float:
    """How long a storage call waits for the database to come back (`study.storage_outage_s`)."""
    return float(space.study.storage_outage_s or DEFAULT_OUTAGE_S)


def _engine_kwargs(parsed: sqlalchemy.engine.URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "sqlite":
        # Several local workers on one SQLite file: wait for the lock rather than dying of 'database is locked'.
        return {"connect_args": {"timeout": 120}}
    # pre-ping: a pooled connection the server dropped (a restart) is replaced before use, not failed on.
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() in ("postgresql", "mysql"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def make_storage(space: Space, url: str | None = None) -> ResilientStorage:
    """An RDB storage with heartbeats: a worker killed mid-trial leaves it RUNNING, the next worker marks it FAIL
    after the grace period and re-runs its parameters (resuming from the trial's last epoch checkpoint). Its calls
    wait out an outage of the database for up to `study.storage_outage_s` (`resilient.ResilientStorage`)."""
    url = url or space.storage_url
    settings = space.study
    parsed = _parse_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    engine_kwargs = _engine_kwargs(parsed)
    for attempt in range(CREATE_ATTEMPTS):
        try:
            storage = ResilientStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=settings.heartbeat_interval_s,
                grace_period=settings.grace_period_s,
                heartbeat_stale_trial_callback=RetryStaleTrial(settings.max_retry, settings.grace_period_s),
                outage_s=outage_limit_s(space),
                shown_url=safe_url(url),
            )
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError,
                optuna.exceptions.StorageInternalError) as err:
            # Two starters creating the schema at once: one wins, the other sees a duplicate table, type or
            # alembic version row. The schema is then there: try again.
            if attempt == CREATE_ATTEMPTS - 1:
                raise StudyError(f"storage {safe_url(url)}: cannot open: {_reason(err)}") from None
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except Exception as err:
            raise StudyError(f"storage {safe_url(url)}: cannot open: {_reason(err)}") from None
    if sqlite:
        _serialise_sqlite(storage.engine)
    return storage


def existing_study(storage: RDBStorage, name: str) -> optuna.Study | None:
    names = {s.study_name for s in storage.get_all_studies()}
    return optuna.load_study(study_name=name, storage=storage) if name in names else None
