"""Which errors are worth retrying, and a bounded retry that records what it did (the one retry
helper: studies and serving both use it, so it lives in the lowest layer; it imports nothing heavy).

Transient: the network or a server went away for a moment (a database restart, an S3 endpoint
that refuses connections, a 5xx from the tracking server). Deterministic: everything else (bad
parameters, a NaN loss, a full disk): retrying those only repeats the failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

# Class names, so this module imports nothing heavy (sqlalchemy, psycopg2, botocore, requests).
_TRANSIENT_NAMES = frozenset({
    # sqlalchemy / DB-API: connection lost, server restarting, admin shutdown
    "OperationalError", "InterfaceError", "DisconnectionError",
    # botocore / boto3
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "ConnectionError",
    # requests / urllib3
    "ConnectTimeout", "ReadTimeout", "ProtocolError", "NewConnectionError", "MaxRetryError",
    "RemoteDisconnected", "IncompleteRead",
})
# MLflow REST errors that mean "try again" rather than "you asked for something wrong".
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"})
# Database errors that are OperationalErrors but not transient.
_DETERMINISTIC_TEXT = ("does not exist", "password authentication failed", "permission denied", "no such table",
                       "disk full", "no space left")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later may succeed."""
    return transient_cause(exc) is not None


def transient_cause(exc: BaseException) -> BaseException | None:
    """The error in the chain that makes `exc` transient (e.g. the OperationalError under
    Optuna's StorageInternalError), or None."""
    for e in causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return e
        name = type(e).__name__
        if name in _TRANSIENT_NAMES:
            return None if any(text in str(e).lower() for text in _DETERMINISTIC_TEXT) else e
        if getattr(e, "error_code", None) in _TRANSIENT_CODES:
            return e
        status = getattr(e, "get_http_status_code", None)
        if callable(status) and status() in (502, 503, 504):
            return e
    return None


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for a tag or a user attribute."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@dataclass
class RetryLog:
    """What was retried, in order: `what: attempt k failed (Type: message)`. Keeps the last 200
    entries; `mark()`/`since()` count every entry ever added, so trimming never shifts them."""

    entries: list[str] = field(default_factory=list)
    dropped: int = 0

    def add(self, what: str, attempt: int, exc: BaseException) -> None:
        self.entries.append(f"{what}: attempt {attempt} failed ({describe(transient_cause(exc) or exc)})"[:500])
        if len(self.entries) > 200:
            self.dropped += len(self.entries) - 200
            del self.entries[:-200]

    def mark(self) -> int:
        return self.dropped + len(self.entries)

    def since(self, mark: int) -> list[str]:
        return self.entries[max(0, mark - self.dropped):]


def retry_call(
    action: Callable[[], T],
    what: str,
    *,
    attempts: int,
    delay: float = 0.5,
    max_delay: float = 8.0,
    retry_if: Callable[[BaseException], bool] = is_transient,
    log: RetryLog | None = None,
) -> T:
    """Call `action`; on an error `retry_if` accepts, wait (exponential backoff) and call again,
    at most `attempts` times in all. Any other error, or the last one, is raised as is."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as e:
            if attempt == attempts or not retry_if(e):
                raise
            if log is not None:
                log.add(what, attempt, e)
            time.sleep(min(max_delay, delay * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")  # pragma: no cover
