"""Logging off the critical path: one thread sends a trial's end (metrics, tags, model upload,
status) while the next trial trains; each step is retried (client.retry_step) and a step that
fails for good is reported, never raised into the study."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from models.faults import RetryLog, describe
from studies.tracking.client import TrackingError, retry_step

if TYPE_CHECKING:
    from mlflow import MlflowClient


class BackgroundLog:
    """A one-thread queue of logging steps for the runs of one process."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.errors: list[str] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._futures: list[Future[None]] = []

    def submit(self, run_id: str, action: Callable[[], None], what: str, *,
               on_error: Callable[[str], None] | None = None, cleanup: Path | None = None) -> None:
        """Queue `action` for run `run_id`; retries that got through are written to the run's
        `workbench.retries` tag, a failure to `on_error` and the warnings; `cleanup`'s parent
        folder (a saved model) is removed afterwards."""
        def task() -> None:
            log = RetryLog()
            try:
                retry_step(action, f"{what} (run {run_id})", log)
                if log.entries:  # it got through in the end: say what it took
                    self.client.set_tag(run_id, "workbench.retries", "; ".join(log.entries)[:8000])
            except TrackingError as e:
                self.warn(str(e))
                if on_error is not None:
                    on_error("; ".join([*log.entries, str(e)]))
            except Exception as e:  # the retries tag itself: never worth failing the trial over
                self.warn(f"{what} (run {run_id}): {describe(e)}")
            finally:
                if cleanup is not None:
                    shutil.rmtree(cleanup.parent, ignore_errors=True)

        self.run(task)

    def run(self, task: Callable[[], None]) -> None:
        """Queue a task as is (its errors surface in `wait`)."""
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(task))

    def warn(self, message: str) -> None:
        self.errors.append(message)
        print(f"warning: {message}", file=sys.stderr)

    def wait(self) -> None:
        """Block until every queued step has run."""
        for future in list(self._futures):
            future.result()
        self._futures.clear()

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
