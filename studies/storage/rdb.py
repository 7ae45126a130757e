"""An Optuna RDB storage (SQLite, PostgreSQL, AWS RDS): opened with connection checks, its calls
retried across a lost connection, its failures reported plainly with the password masked."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import WorkbenchError
from models.faults import RetryLog, describe, is_transient, retry_call
from studies.storage import trial_rows
from studies.storage.running import RunningTrials

if TYPE_CHECKING:
    import optuna

# Storage calls a trial makes; each is retried on connection errors (a database restart, a
# failover of a managed PostgreSQL) instead of failing the worker.
_RETRIED = (
    "create_new_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "get_trial_param",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial",
    # Optuna's trial cache calls these internals directly; the public create_new_trial,
    # set_trial_param, get_all_trials and get_best_trial go through them too.
    "_create_new_trial", "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids",
)  # ResilientRDBStorage retries its own writes: _set_trial_param, set_trial_intermediate_value, set_trial_user_attrs
# (set_trial_user_attr included: studies.storage.running makes it one set_trial_user_attrs)
# A database restart takes a few seconds; a managed failover up to a minute or two.
STORAGE_ATTEMPTS = 10
STORAGE_MAX_DELAY = 15.0


class StorageError(WorkbenchError):
    """The storage cannot be reached or used; the message says which URL (without password)."""


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class WalConnection(sqlite3.Connection):
    """A connection to a study's SQLite file in write-ahead-log mode (set once, kept by the file):
    a commit appends to the log without waiting for the disk (synchronous=NORMAL), which halved a
    trial's storage time (54 -> 27 ms for 8 params, 3 reports, 10 attributes), and readers (the
    dashboard, other workers) no longer block the writer. A killed process loses no commit; a power
    loss may lose the last ones, never the file. Where WAL cannot be set (a read-only file, a
    database another process holds locked) the file keeps its mode."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            mode = self.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode and str(mode[0]).lower() == "wal":  # NORMAL is safe against power loss in WAL mode only
                self.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError:
            pass


class _Held:
    """A trial's writes held back by one_transaction: parameter rows, user attributes."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.params: list[dict[str, Any]] = []
        self.user_attrs: dict[str, Any] = {}

    def write(self, session: Any) -> None:
        trial_rows.check_updatable(self.storage, session, self.trial_id)
        self.rows(session)

    def rows(self, session: Any) -> None:
        """The held rows, the trial's state checked before (`write`, or the caller)."""
        if self.params:
            trial_rows.insert_params(session, self.params)
        if self.user_attrs:
            trial_rows.write_user_attrs(self.storage, session, self.trial_id, self.user_attrs)


@functools.cache
def resilient_storage_class() -> type:
    """RDBStorage whose calls survive a lost connection: retried with backoff (bounded), each
    retry written to `retry_log`, and that reads the trials this process runs from memory
    (studies.storage.running). Optuna wraps it in its trial cache like any RDBStorage."""
    import optuna

    def retrying(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self, *args: Any, **kwargs: Any) -> Any:
            return retry_call(lambda: method(self, *args, **kwargs), f"storage.{name}", attempts=STORAGE_ATTEMPTS,
                              max_delay=STORAGE_MAX_DELAY, log=self.retry_log)

        return call

    class ResilientRDBStorage(optuna.storages.RDBStorage):
        retry_log: RetryLog
        _held = threading.local()  # this thread's writes held back inside one_transaction (of one storage)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            attempt = 0

            def once() -> bool:
                nonlocal attempt
                attempt += 1
                try:
                    return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # A retry after a commit whose reply was lost: the trial already holds this state.
                    if attempt > 1 and self.get_trial(trial_id).state == state:
                        return True
                    raise

            return retry_call(once, "storage.set_trial_state_values", attempts=STORAGE_ATTEMPTS,
                              max_delay=STORAGE_MAX_DELAY, log=self.retry_log)

        def _call(self, name: str, call: Callable[[], Any]) -> Any:
            """`call()`, retried across a lost connection."""
            return retry_call(call, f"storage.{name}", attempts=STORAGE_ATTEMPTS, max_delay=STORAGE_MAX_DELAY,
                              log=self.retry_log)

        def _write(self, name: str, write: Callable[[Any], None]) -> None:
            """`write(session)` in one transaction, retried across a lost connection."""
            from optuna.storages._rdb.storage import _create_scoped_session

            def once() -> None:
                with _create_scoped_session(self.scoped_session, True) as session:
                    write(session)

            self._call(name, once)

        @contextlib.contextmanager
        def one_transaction(self, trial_id: int) -> Iterator[None]:
            """The trial's parameters and user attributes set inside the block reach the database
            in one transaction as it ends (studies.storage.trial_rows), not one each: a trial
            sets ~12 before training, each a transaction that looks the trial up again. Reads
            inside the block do not see them, so it holds sampling only (the sampler reads the
            study's trials once, before the first parameter). A parameter whose name this process
            has not stored yet is written at once: its compatibility with the study's earlier
            trials is checked against the database, as Optuna does. Raising inside the block
            still writes what was set; a failed write then gives way to the block's own exception."""
            held = _Held(self, trial_id)
            self._held.batch = held
            completed = False
            try:
                yield
                completed = True
            finally:
                self._held.batch = None
                if held.params or held.user_attrs:
                    try:
                        self._write_block(held)
                    except Exception:
                        if completed:
                            raise

        def _write_block(self, held: _Held) -> None:
            """The block's writes, in one transaction (studies.storage.running adds its own to it)."""
            self._write("one_transaction", held.write)

        def _holding(self, trial_id: int) -> _Held | None:
            held = getattr(self._held, "batch", None)
            return held if held is not None and held.storage is self and held.trial_id == trial_id else None

        def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any,
                             previous_distribution: Any) -> None:
            held = self._holding(trial_id)
            if held is None or previous_distribution is None:
                retry_call(lambda: optuna.storages.RDBStorage._set_trial_param(
                    self, trial_id, param_name, param_value_internal, distribution, previous_distribution),
                    "storage._set_trial_param", attempts=STORAGE_ATTEMPTS, max_delay=STORAGE_MAX_DELAY,
                    log=self.retry_log)
                return
            # Raised here, as the write would: Optuna's trial cache records the distribution once this returns.
            optuna.distributions.check_distribution_compatibility(previous_distribution, distribution)
            held.params.append(trial_rows.param_row(trial_id, param_name, param_value_internal, distribution))

        def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
            """Several user attributes in one statement (Optuna writes one per call, and looks the
            trial up for each)."""
            held = self._holding(trial_id)
            if held is not None:
                held.user_attrs.update(attrs)
                return
            attrs = dict(attrs)

            def write(session: Any) -> None:
                trial_rows.check_updatable(self, session, trial_id)
                trial_rows.write_user_attrs(self, session, trial_id, attrs)

            self._write("set_trial_user_attrs", write)

        def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
            def write(session: Any) -> None:  # one statement, where Optuna reads the step's row first
                trial_rows.check_updatable(self, session, trial_id)
                trial_rows.write_intermediate_values(self, session, trial_id, {step: intermediate_value})

            self._write("set_trial_intermediate_value", write)

        def record_heartbeat(self, trial_id: int) -> None:
            # Runs in Optuna's heartbeat thread, which dies on the first exception: a missed beat
            # is logged and the next interval tries again.
            try:
                optuna.storages.RDBStorage.record_heartbeat(self, trial_id)
            except Exception as e:
                if not is_transient(e):
                    raise
                self.retry_log.add("storage.record_heartbeat", 1, e)
                print(f"warning: heartbeat of trial id {trial_id} not recorded: {describe(e)}", file=sys.stderr)

    for name in _RETRIED:
        setattr(ResilientRDBStorage, name, retrying(name, getattr(optuna.storages.RDBStorage, name)))

    class WorkbenchRDBStorage(RunningTrials, ResilientRDBStorage):
        """Reads of the trials this process runs answered from memory (studies.storage.running)."""

    return WorkbenchRDBStorage


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    max_retry: int | None = None,
    curve_seconds: float | None = None,
) -> optuna.storages.RDBStorage:
    """An RDB storage whose pooled connections are checked before use (pool_pre_ping) and whose
    calls are retried across a lost connection (see resilient_storage_class).

    Any SQLAlchemy URL works, e.g. `postgresql+psycopg2://user:pw@host:5432/db?sslmode=require`
    for AWS RDS; query parameters reach the driver unchanged.

    With a heartbeat, a trial whose worker died (no beat for 2 intervals) is failed by the next
    worker to start a trial and queued again with the same parameters, at most `max_retry` times
    (RetryHeartbeatStaleTrialCallback); `on_stale` is then told about it (e.g. to close its run).

    A running trial's intermediate values reach the database with its next write, or
    `curve_seconds` after its last (studies.storage.running; default FLUSH_SECONDS).
    """
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(f"storage URL is not a valid SQLAlchemy URL, got {url!r}") from None
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Several processes may write one file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60, "factory": WalConnection}
    else:
        engine_kwargs["pool_recycle"] = 1800  # below common server/NAT idle cut-offs
        # A worker uses two connections at most (its main thread and the heartbeat thread):
        # 16 workers stay far below PostgreSQL's default max_connections of 100.
        engine_kwargs["pool_size"] = 2
        engine_kwargs["max_overflow"] = 2
    stale = None
    if heartbeat_interval is not None:
        stale = StaleTrialHandler(optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry), on_stale)
    def create() -> optuna.storages.RDBStorage:
        storage = resilient_storage_class()(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=None if heartbeat_interval is None else 2 * heartbeat_interval,
            heartbeat_stale_trial_callback=stale,
        )
        storage.retry_log = RetryLog()  # where its retried calls are recorded
        storage.curve_seconds = curve_seconds
        return storage

    try:
        # Processes creating the schema of a fresh database at once: the losers find the
        # winner's tables or rows, and simply open the storage again.
        storage = retry_call(create, f"opening storage {redact(url)}", attempts=_CREATE_ATTEMPTS, delay=0.2,
                             retry_if=_schema_race)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage {redact(url)}: {_reason(e)}") from None
    return storage


_CREATE_ATTEMPTS = 5


def _reason(e: BaseException) -> str:
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


def _schema_race(e: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in _reason(e)


class StaleTrialHandler:
    """Optuna's stale-trial callback: re-queue the trial (RetryHeartbeatStaleTrialCallback), then
    tell `on_stale` (set later, once the tracker exists)."""

    def __init__(self, retry: Callable[..., None], on_stale: Callable[..., None] | None = None) -> None:
        self.retry = retry
        self.on_stale = on_stale

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(f"trial {trial.number} lost its worker (no heartbeat): marked FAIL, queued for a retry",
              file=sys.stderr)
        self.retry(study, trial)
        if self.on_stale is not None:
            self.on_stale(study, trial)
