"""The Dask engine: the plan's parts scored in parallel on a `dask.distributed` cluster.

`--scheduler tcp://host:8786` joins a running cluster (compose's `dask` profile); without it a local
cluster of `--workers` processes is started for the job. Each worker loads the pinned model once
(`job.worker_model`) and runs the same `run_part` as the single-process engine. A part whose worker
dies is run again by Dask on another worker: parts are written atomically (files) or upserted on the
key (tables), so a row is never kept twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.batch.job import PartResult, PartTask, Plan, Stopped, run_part, worker_model
from serving.batch.objects import BatchError
from serving.batch.sources import Part
from serving.store import ServingError

SETTINGS = Path(__file__).with_name("dask.yaml")  # also /etc/dask/ in the workbench image


def score_remote(part: Part, task: PartTask) -> PartResult:
    """A Dask task: one part, with this worker's copy of the model."""
    return run_part(task, part, worker_model(task.model))


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A client of the given scheduler, or of a local cluster of `workers` processes."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ServingError(f"--scheduler: cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            yield client
        return
    with local_cluster(workers) as address, Client(address) as client:
        yield client


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[str]:
    """A local cluster of `workers` processes (one thread each) while the block runs; yields its
    scheduler's address. `--every` keeps one for all its runs: a worker loads the model once, not
    once a run (a cold job, cluster start and model loads included, ran at 0.12-0.21x a warm one)."""
    import dask
    from distributed import LocalCluster

    if workers < 1:
        raise BatchError(f"--workers: must be >= 1, got {workers}")
    with dask.config.set(worker_settings()), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def worker_settings() -> dict[str, Any]:
    """serving/batch/dask.yaml as dotted keys (`dask.config.set` would replace a nested mapping whole)."""
    import yaml

    def flat(tree: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(flat(yaml.safe_load(SETTINGS.read_text()), ""))


def run_dask(p: Plan, *, scheduler: str | None, workers: int, stop: threading.Event | None = None) -> list[PartResult]:
    """Every part on the cluster; results in part order. `stop` (SIGTERM) cancels the parts not
    started yet and raises Stopped once the running ones are done (each is whole or not written)."""
    from distributed import as_completed

    if not p.parts:
        return []
    results = []
    with connect(scheduler, workers) as client:
        task = client.scatter(p.task, broadcast=True)
        futures = client.map(score_remote, p.parts, task=task, pure=False)
        for future in as_completed(futures):
            results.append(future.result())
            if stop is not None and stop.is_set():
                client.cancel([f for f in futures if not f.done()])
                raise Stopped(f"stopped after {len(results)} of {len(futures)} parts")
    return sorted(results, key=lambda r: r.index)
