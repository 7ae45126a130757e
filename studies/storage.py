"""Optuna storage: resolve the URL, open it with connection checks, report failures plainly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search_spaces.errors import WorkbenchError

if TYPE_CHECKING:
    import optuna


class StorageError(WorkbenchError):
    """The storage cannot be reached or used; the message says which URL (without password)."""


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def resolve_url(flag: str | None, environment: str | None, configured: str | None, default: str) -> str:
    """Precedence: --storage, then OPTUNA_STORAGE, then the config's study.storage, then the default."""
    for candidate in (flag, environment, configured):
        if candidate:
            return candidate
    return default


def open_storage(url: str, *, heartbeat_interval: int | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage whose pooled connections are checked before use (pool_pre_ping).

    Any SQLAlchemy URL works, e.g. `postgresql+psycopg2://user:pw@host:5432/db?sslmode=require`
    for AWS RDS; query parameters reach the driver unchanged.
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
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_recycle"] = 1800  # below common server/NAT idle cut-offs
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=None if heartbeat_interval is None else 2 * heartbeat_interval,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from None
