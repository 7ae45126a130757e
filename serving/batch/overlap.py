"""Reading the next chunk and writing the last one while the current one is scored.

A part's time is read + score + write; Parquet, CSV, COPY and S3 I/O release the GIL, so a reader
thread and a writer thread take it off the scoring thread's critical path. Both hold at most
`depth` chunks (memory stays bounded) and hand their errors to the scoring thread unchanged (so a
transient database error is still retried as one).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def ahead(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """`items`, produced by a background thread up to `depth` ahead. Closing this generator early
    stops the thread and closes `items` there."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    quit_ = threading.Event()

    def put(item: Any) -> bool:
        while not quit_.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(_END)
        except BaseException as e:  # handed over, raised in the consuming thread
            put(_Failed(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        quit_.set()
        thread.join()


class Writer(Protocol):
    def write(self, frame: Any) -> None: ...


class WriteBehind:
    """Writes frames with `writer` in a background thread, in order; `close()` waits for the last
    one and raises the first error (as does a `write()` after it)."""

    def __init__(self, writer: Writer, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is _END:
                return
            if self._error is None:
                try:
                    self._writer.write(frame)
                except BaseException as e:
                    self._error = e

    def write(self, frame: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(frame)

    def close(self) -> None:
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
