"""`--every 5m`: run a job again and again until SIGTERM or Ctrl-C.

A signal sets `stop`: the job in progress finishes its current chunk (a table keeps what it has
committed, a file part in progress is dropped), and the loop ends without starting another run.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

from serving.batch.objects import BatchError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_every(text: str) -> float:
    """Seconds in `30s`, `5m`, `1h`, `1d` or a plain number of seconds."""
    match = _DURATION.match(text)
    if not match or float(match[1]) <= 0:
        raise BatchError(f"--every: a positive duration like 30s, 5m, 1h or 1d, got {text!r}")
    return float(match[1]) * _UNIT[match[2]]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGINT set (a second Ctrl-C interrupts at once); the previous
    handlers are back when the block ends (the command may run inside another program)."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def repeat(run_once: Callable[[], int], every: float, stop: threading.Event) -> int:
    """Call `run_once` every `every` seconds (measured from each start) until `stop`; the exit code
    is the last run's."""
    code = 0
    while not stop.is_set():
        started = time.monotonic()
        code = run_once()
        if stop.wait(max(0.0, every - (time.monotonic() - started))):
            break
    return code
