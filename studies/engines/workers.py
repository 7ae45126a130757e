"""`--workers N`: N worker processes on one shared storage, and how a runner stops on a signal.

Optuna's RDB storage is the distributed engine: each worker is the same runner with
`--worker-index i`, asking the storage for its next trial; nothing is scheduled here. This
module only starts the processes, passes on SIGTERM/SIGINT, and reports how they ended.
Processes, not threads: TensorFlow and the GIL would serialise threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TypedDict

# How long stopping workers get to record their running trial as FAIL before being killed.
STOP_GRACE_SECONDS = 30.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the running trial ends as FAIL with reason "interrupted (SIG...)"."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interruption_reason(e: KeyboardInterrupt) -> str:
    """The fail_reason of a trial cut by a signal (`interrupted (SIGTERM)`) or by Ctrl-C."""
    return f"interrupted ({e})" if str(e) else "interrupted"


class _Deferral(TypedDict):
    depth: int  # nesting of signals_deferred sections
    pending: int | None  # a signal that arrived inside one, raised when the outermost ends


_deferral: _Deferral = {"depth": 0, "pending": None}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A section a signal must not cut in two (e.g. creating a trial's MLflow run and learning
    its id): a SIGINT/SIGTERM arriving inside is raised as Interrupted when the section ends."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        if not _deferral["depth"]:
            _raise_pending()


@contextmanager
def signals_allowed() -> Iterator[None]:
    """Inside a deferred section, a section a signal may cut at once because its own handler
    records the interruption (the body of a trial). A signal that arrived earlier in the
    deferred section is raised on entry, so a trial created meanwhile ends as interrupted."""
    depth, _deferral["depth"] = _deferral["depth"], 0
    try:
        _raise_pending()
        yield
    finally:
        _deferral["depth"] = depth


def signal_pending() -> bool:
    """Whether a signal is waiting for its deferred section to end."""
    return _deferral["pending"] is not None


def raise_if_signalled() -> None:
    """A point where a trial may stop: a signal that waited for TensorFlow to return to this
    code (see SignalStop) is raised here, unless a deferred section is open (it ends there)."""
    if not _deferral["depth"]:
        _raise_pending()


def _raise_pending() -> None:
    pending, _deferral["pending"] = _deferral["pending"], None
    if pending is not None:
        raise Interrupted(pending)


# Packages whose frames a signal must not raise into: TensorFlow's C++ calls back into Python
# (tracing, tf.nest, converting to tensors) and an exception raised there is turned into another
# (seen: "TypeError: Failed to convert elements of (None,) to Tensor", the trial then failed as an
# error and the process ran on) or leaves its state broken (seen: a segmentation fault on exit).
_NO_RAISE_PACKAGES = ("tensorflow", "keras", "tf_keras")


def _say(line: str) -> None:
    """A line to stderr from a signal handler: os.write, since the handler may have interrupted a
    print to the same stream (a buffered stream refuses a reentrant write)."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


def _inside_tensorflow(frame: FrameType | None) -> bool:
    """Whether TensorFlow's or Keras's code is on the stack that `frame` tops."""
    files = (getattr(sys.modules.get(name), "__file__", None) for name in _NO_RAISE_PACKAGES)
    roots = tuple(os.path.dirname(file) + os.sep for file in files if file)
    while roots and frame is not None:
        if frame.f_code.co_filename.startswith(roots):
            return True
        frame = frame.f_back
    return False


class SignalStop:
    """SIGTERM behaves like Ctrl-C: the first SIGINT or SIGTERM raises Interrupted in the main
    thread. Once the study loop has ended (`closing`: recording the running trials, closing the
    MLflow runs, the report), a first signal lets that clean-up finish and the command then stops
    before anything else (registering the winner is left to a rerun); a signal after that one stops
    at once, so a clean-up stuck on a service that went away never holds the terminal.

    A signal that lands while TensorFlow or Keras is on the stack waits, like one in a deferred
    section, and is raised at the next point that may stop a trial (`raise_if_signalled`: each
    epoch's end, between a trial's steps) or where a deferred section ends: at most the longest
    step TensorFlow takes on its own, a trial's first epoch with its tracing (~1 s here)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.closing:
            if self.signum is None:
                self.signum = signum
                _say(f"{signal.Signals(signum).name}: finishing the study's records, then stopping; "
                     "a second signal stops at once")
                return
            _say(f"{signal.Signals(signum).name}: stopping at once; the next run closes what is left open")
            raise Interrupted(signum)
        if self.signum is not None:
            return
        self.signum = signum
        if _deferral["depth"] or _inside_tensorflow(frame):
            _deferral["pending"] = signum
            return
        raise Interrupted(signum)

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


@dataclass
class WorkersOutcome:
    codes: list[int] = field(default_factory=list)
    signal: int | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def killed(self) -> list[int]:
        """Indices of workers that died on a signal they did not handle (e.g. SIGKILL, OOM)."""
        return [i for i, c in enumerate(self.codes) if c < 0]

    @property
    def failed(self) -> list[int]:
        return [i for i, c in enumerate(self.codes) if c > 0 and c not in (130, 143)]


def worker_argv(argv: list[str], index: int) -> list[str]:
    """The runner's own command line for worker `index`: without --workers, with --worker-index."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "studies.run", *out, "--worker-index", str(index)]


def run_workers(argv: list[str], n: int, *, env: dict[str, str] | None = None) -> WorkersOutcome:
    """Start n workers and wait for all of them. SIGTERM/SIGINT to this process go to every
    worker (each records its running trial as FAIL "interrupted"); workers still alive after
    STOP_GRACE_SECONDS are killed and left to the heartbeat."""
    outcome = WorkersOutcome()
    procs = [subprocess.Popen(worker_argv(argv, i), env=env) for i in range(n)]
    outcome.pids = [p.pid for p in procs]
    deadline: float | None = None

    def forward(signum: int, frame: object) -> None:
        nonlocal deadline
        if outcome.signal is None:
            outcome.signal = signum
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            print(f"{signal.Signals(signum).name}: stopping {n} workers (their running trials end as FAIL)", file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                _send(p, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        print(f"worker pid {p.pid} did not stop in {STOP_GRACE_SECONDS:.0f} s: killing it", file=sys.stderr)
                        _send(p, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    outcome.codes = [p.returncode for p in procs]
    for i in outcome.killed:
        print(f"warning: worker {i} (pid {procs[i].pid}) died on {signal.Signals(-outcome.codes[i]).name}; "
              "its running trial is failed and retried", file=sys.stderr)
    return outcome


def _send(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        pass
