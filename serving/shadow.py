"""Shadow traffic: the challenger scores a sampled share of live requests after the champion's
answer has been sent, never delaying or failing it; the evidence goes to `/metrics` and MLflow.

`SERVING_SHADOW_ALIAS=challenger SERVING_SHADOW_FRACTION=0.1`: a request is sampled with that
probability and its raw rows queued (bounded: when the queue is full the sample is dropped and
counted). A background task scores the queue with the challenger in a worker thread, in batches,
and accumulates per champion/challenger pair: requests, rows, agreeing rows (the same label;
classification) or the sum of |challenger - champion| (regression), errors and the challenger's
scoring time. Every `SERVING_SHADOW_LOG_SECONDS` (and at shutdown) the increments are logged to one
MLflow run per pair in the `workbench-shadow` experiment, tagged with the model and both versions;
`read_evidence` adds them up over every run and server process (studies.select uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from serving.metrics import Metrics
    from serving.model import LoadedModel
    from serving.store import Store
    from serving.versions import Served

EXPERIMENT = "workbench-shadow"
MODEL_TAG, CHAMPION_TAG, CHALLENGER_TAG = "workbench.shadow.model", "workbench.shadow.champion", "workbench.shadow.challenger"
QUEUE_LIMIT = 1000  # sampled requests waiting for the challenger; more are dropped (and counted)
GATHER_SECONDS = 0.05  # how long samples gather before the challenger scores them
log = logging.getLogger("serving.shadow")


@dataclass
class Tally:
    """What one champion/challenger pair accumulated (since the last flush, or in all)."""

    requests: int = 0
    rows: int = 0
    agreeing_rows: int = 0  # classification: the challenger gave the champion's label
    abs_diff_sum: float = 0.0  # regression: sum over rows of |challenger - champion|
    errors: int = 0
    dropped: int = 0
    challenger_seconds: float = 0.0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Evidence:
    """The shadow evidence of one pair, added up over every run that logged it."""

    model: str
    champion: str
    challenger: str
    task: str | None
    total: Tally = field(default_factory=Tally)
    runs: int = 0

    @property
    def agreement(self) -> float | None:
        """Share of rows with the champion's label (classification)."""
        return self.total.agreeing_rows / self.total.rows if self.total.rows and self.task != "regression" else None

    @property
    def mean_abs_diff(self) -> float | None:
        """Mean |challenger - champion| over rows (regression)."""
        return self.total.abs_diff_sum / self.total.rows if self.total.rows and self.task == "regression" else None

    def describe(self) -> str:
        t = self.total
        if not t.requests:
            return f"no shadow traffic recorded for {self.model} v{self.champion} vs v{self.challenger}"
        score = (f"agreement {self.agreement:.4f}" if self.agreement is not None else
                 f"mean |difference| {self.mean_abs_diff:.4g}" if self.mean_abs_diff is not None else "no rows scored")
        return (f"{t.requests} shadow requests ({t.rows} rows, {t.errors} errors) of {self.model} v{self.challenger} beside "
                f"champion v{self.champion}: {score}, challenger {1000 * t.challenger_seconds / max(t.requests, 1):.2f} ms/request")


@dataclass
class _Sample:
    served: Served
    kind: str  # instances | records | array
    rows: Any
    champion_predictions: list[Any]


class Shadow:
    """Samples requests, scores them with the challenger off the request path, keeps the tallies."""

    def __init__(self, fraction: float, *, metrics: Metrics | None, store: Store | None, log_seconds: float,
                 seed: int | None = None) -> None:
        self.fraction = fraction
        self.metrics = metrics
        self.store = store
        self.log_seconds = log_seconds
        self._random = random.Random(seed)
        self._queue: deque[_Sample] = deque()
        self._wake = asyncio.Event()
        self.pending: dict[tuple[str, str, str, str], Tally] = {}  # (model, champion, challenger, task) -> since last flush
        self.totals: dict[tuple[str, str, str, str], Tally] = {}
        self._runs: dict[tuple[str, str, str], str] = {}
        self._tasks: list[asyncio.Task] = []

    # -- the request path: O(1), never raises --------------------------------------------
    def offer(self, served: Served, kind: str, rows: Any, champion_predictions: list[Any]) -> None:
        if served.challenger is None or self._random.random() >= self.fraction:
            return
        if len(self._queue) >= QUEUE_LIMIT:
            self._tally_key(_key(served)).dropped += 1
            self._count(served, "dropped")
            return
        self._queue.append(_Sample(served, kind, rows, champion_predictions))
        self._wake.set()

    # -- the background side ---------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._score_forever()), asyncio.create_task(self._log_forever())]

    async def stop(self) -> None:
        """Score what is queued, log the last increments."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.drain()
        await self.flush()

    async def drain(self) -> None:
        """Score every queued sample (tests call it to wait for the shadow). The challenger runs in
        a worker thread; the tallies are only touched here, on the event loop."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 256))]
            outcomes = await asyncio.to_thread(_score_all, batch)
            for sample, outcome in zip(batch, outcomes, strict=True):
                self._record(sample, outcome)

    async def flush(self) -> None:
        """Log each pair's increments since the last flush to its MLflow run; what could not be
        logged is kept for the next flush."""
        if self.store is None:
            return
        pending, self.pending = self.pending, {}
        pending = {k: t for k, t in pending.items() if t.requests or t.dropped}
        totals = {k: self.totals.get(k, Tally()) for k in pending}
        failed = await asyncio.to_thread(self._log_all, pending, totals)
        for key, tally in pending.items():
            if key in failed:
                self._tally_key(key).add(tally)
            else:
                self.totals.setdefault(key, Tally()).add(tally)

    async def _score_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(GATHER_SECONDS)  # let samples gather: one worker-thread hand-off per batch
            self._wake.clear()
            await self.drain()

    async def _log_forever(self) -> None:
        while True:
            await asyncio.sleep(self.log_seconds)
            await self.flush()

    def _record(self, sample: _Sample, outcome: _Outcome) -> None:
        challenger = sample.served.challenger
        assert challenger is not None  # offer() queues only with a challenger
        tally = self._tally_key(_key(sample.served))
        tally.requests += 1
        labels = self._labels(sample.served)
        if outcome.error is not None:
            tally.errors += 1
            self._count(sample.served, "error")
            log.warning("shadow challenger v%s failed: %s", challenger.resolved.version, outcome.error)
            return
        tally.rows += outcome.rows
        tally.challenger_seconds += outcome.seconds
        tally.agreeing_rows += outcome.agreeing_rows
        tally.abs_diff_sum += outcome.abs_diff_sum
        if self.metrics is not None:
            self._count(sample.served, "scored")
            self.metrics.shadow_rows.labels(*labels).inc(outcome.rows)
            if challenger.task == "regression":
                self.metrics.shadow_abs_diff.labels(*labels).inc(outcome.abs_diff_sum)
            else:
                self.metrics.shadow_agreeing.labels(*labels).inc(outcome.agreeing_rows)
            self.metrics.shadow_latency.labels(labels[1]).observe(outcome.seconds)

    def _labels(self, served: Served) -> tuple[str, str]:
        assert served.challenger is not None
        return served.champion.resolved.version or "", served.challenger.resolved.version or ""

    def _count(self, served: Served, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.shadow_requests.labels(*self._labels(served), outcome).inc()

    def _tally_key(self, key: tuple[str, str, str, str]) -> Tally:
        tally = self.pending.get(key)
        if tally is None:
            tally = self.pending[key] = Tally()
        return tally

    # -- MLflow (in a worker thread) ---------------------------------------------------------
    def _log_all(self, pending: dict[tuple[str, str, str, str], Tally],
                 totals: dict[tuple[str, str, str, str], Tally]) -> set[tuple[str, str, str, str]]:
        failed = set()
        for key, tally in pending.items():
            try:
                self._log(key, tally, totals[key])
            except Exception as e:
                log.warning("could not log shadow evidence to MLflow (kept for the next try): %s", e)
                failed.add(key)
        return failed

    def _log(self, key: tuple[str, str, str, str], tally: Tally, before: Tally) -> None:
        from mlflow.entities import Metric

        assert self.store is not None
        client = self.store.client
        model, champion, challenger, task = key
        run_id = self._runs.get(key[:3]) or _run_for(client, model, champion, challenger, task)
        self._runs[key[:3]] = run_id
        now = int(time.time() * 1000)
        values = {f"delta_{f.name}": float(getattr(tally, f.name)) for f in fields(tally)}
        total = Tally()
        total.add(before)
        total.add(tally)
        if total.rows:  # this process's running figures, for reading in the MLflow UI
            values["process_" + ("mean_abs_diff" if task == "regression" else "agreement")] = (
                total.abs_diff_sum / total.rows if task == "regression" else total.agreeing_rows / total.rows)
        client.log_batch(run_id, metrics=[Metric(k, v, now, now) for k, v in values.items()])


@dataclass(frozen=True)
class _Outcome:
    rows: int = 0
    agreeing_rows: int = 0
    abs_diff_sum: float = 0.0
    seconds: float = 0.0
    error: str | None = None


def _key(served: Served) -> tuple[str, str, str, str]:
    assert served.challenger is not None
    return served.name, served.champion.resolved.version or "", served.challenger.resolved.version or "", served.challenger.task


def _score_all(batch: list[_Sample]) -> list[_Outcome]:
    return [_score(sample) for sample in batch]


def _score(sample: _Sample) -> _Outcome:
    """The challenger's answer to one sampled request, compared with the champion's."""
    challenger = sample.served.challenger
    assert challenger is not None
    started = time.perf_counter()
    try:
        theirs, _ = challenger.predict_arrays(_inputs(challenger, sample.kind, sample.rows))
    except Exception as e:  # the challenger's failure is evidence, not an outage
        return _Outcome(error=str(e) or type(e).__name__)
    seconds = time.perf_counter() - started
    if challenger.task == "regression":
        ours = np.asarray(sample.champion_predictions, dtype=np.float64)
        return _Outcome(len(ours), 0, float(np.abs(np.asarray(theirs, dtype=np.float64) - ours).sum()), seconds)
    ours = np.asarray(sample.champion_predictions, dtype=object)
    return _Outcome(len(ours), int((np.asarray(theirs, dtype=object) == ours).sum()), 0.0, seconds)


def _inputs(model: LoadedModel, kind: str, rows: Any) -> np.ndarray:
    if kind == "instances":
        return model.rows_from_instances(rows)
    if kind == "records":
        return model.rows_from_records(rows)
    return model.rows_from_array(rows, "inputs")


def _run_for(client: MlflowClient, model: str, champion: str, challenger: str, task: str) -> str:
    """The pair's run: found by its tags, else created."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else _create_experiment(client)
    query = (f"tags.`{MODEL_TAG}` = '{model}' AND tags.`{CHAMPION_TAG}` = '{champion}' "
             f"AND tags.`{CHALLENGER_TAG}` = '{challenger}'")
    found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{model} v{challenger} shadow of v{champion}",
                            tags={MODEL_TAG: model, CHAMPION_TAG: champion, CHALLENGER_TAG: challenger,
                                  "workbench.shadow.task": task})
    return run.info.run_id


def _create_experiment(client: MlflowClient) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(EXPERIMENT)
    except MlflowException:  # another server process created it first
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def read_evidence(client: MlflowClient, model: str, champion: str, challenger: str) -> Evidence:
    """The pair's shadow evidence, added up over every run (every server process) that logged it."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    evidence = Evidence(model, champion, challenger, None)
    if exp is None:
        return evidence
    query = (f"tags.`{MODEL_TAG}` = '{model}' AND tags.`{CHAMPION_TAG}` = '{champion}' "
             f"AND tags.`{CHALLENGER_TAG}` = '{challenger}'")
    for run in client.search_runs([exp.experiment_id], query, max_results=1000):
        evidence.runs += 1
        evidence.task = run.data.tags.get("workbench.shadow.task", evidence.task)
        for f in fields(Tally):
            history = client.get_metric_history(run.info.run_id, f"delta_{f.name}")
            value = sum(m.value for m in history)
            setattr(evidence.total, f.name, getattr(evidence.total, f.name) + (int(value) if f.type in (int, "int") else value))
    return evidence
