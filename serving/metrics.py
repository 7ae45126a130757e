"""The API's Prometheus metrics (`GET /metrics`), in a registry of their own per app.

Requests by route, status class and model version; latency and rows per request by route; model
loads and reloads by outcome; which version answers in which role (an info-style gauge); the
shadow challenger's agreement, latency and errors (serving.shadow). With several uvicorn workers
(`SERVING_WORKERS`), `python -m serving` points PROMETHEUS_MULTIPROC_DIR at a fresh folder and
`/metrics` adds up every worker.

The request path touches only pre-built label children (a dict lookup and a locked add), so the
metrics cost a few microseconds per request.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# (name, help) of the per-request series, written by RequestSeries or by prometheus_client's metrics.
REQUESTS = ("workbench_http_requests", "HTTP requests by route template, status class and the model version that answered")
LATENCY = ("workbench_http_request_duration_seconds", "Time from the request's start to the response's last byte, by route")
ROWS = ("workbench_rows_per_request", "Rows scored per prediction request, by route template")


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    """Every metric the API exposes; one instance per app."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode the values live in files and are collected at scrape time.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # One process: the per-request series are plain numbers read at scrape time (RequestSeries);
        # several (PROMETHEUS_MULTIPROC_DIR): prometheus_client's file-backed metrics, which add up.
        self._fast: RequestSeries | None = None
        if self.multiprocess:
            self.requests = Counter(REQUESTS[0], REQUESTS[1], ["route", "status", "model_version"], registry=r)
            self.latency = Histogram(LATENCY[0], LATENCY[1], ["route"], buckets=LATENCY_BUCKETS, registry=r)
            self.rows = Histogram(ROWS[0], ROWS[1], ["route"], buckets=ROW_BUCKETS, registry=r)
        else:
            self._fast = RequestSeries()
            r.register(self._fast)
        self.loads = Counter("workbench_model_loads", "Model versions loaded (downloaded and compiled), by outcome",
                             ["outcome"], registry=r)
        self.reloads = Counter("workbench_model_reloads", "Reloads (/reload, polling) by outcome: swapped, unchanged, "
                               "failure", ["outcome"], registry=r)
        self.model_info = Gauge("workbench_model_info", "1 for each loaded model version, with its role (champion "
                                "answers, challenger scores in the shadow, pinned is addressed by version)",
                                ["name", "version", "role"], registry=r, multiprocess_mode="liveall")
        self.shadow_requests = Counter("workbench_shadow_requests", "Requests sampled for the shadow challenger, by "
                                       "outcome: scored, error, dropped (queue full)",
                                       ["champion_version", "challenger_version", "outcome"], registry=r)
        self.shadow_rows = Counter("workbench_shadow_rows", "Rows scored by both champion and challenger",
                                   ["champion_version", "challenger_version"], registry=r)
        self.shadow_agreeing = Counter("workbench_shadow_agreeing_rows", "Rows where the challenger gave the "
                                       "champion's label (classification)", ["champion_version", "challenger_version"],
                                       registry=r)
        self.shadow_abs_diff = Counter("workbench_shadow_abs_diff", "Sum over rows of |challenger - champion| "
                                       "(regression)", ["champion_version", "challenger_version"], registry=r)
        self.shadow_latency = Histogram("workbench_shadow_duration_seconds", "The challenger's scoring time per "
                                        "request", ["challenger_version"], buckets=LATENCY_BUCKETS, registry=r)
        self._request_children: dict[tuple[str, int, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._rows_children: dict[str, Any] = {}
        self._model_labels: set[tuple[str, str, str]] = set()

    def observe_request(self, route: str, status: int, version: str, seconds: float) -> None:
        if self._fast is not None:
            self._fast.request(route, status, version, seconds)
            return
        key = (route, status, version)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(route, _status_class(status), version)
        counter.inc()
        histogram = self._latency_children.get(route)
        if histogram is None:
            histogram = self._latency_children[route] = self.latency.labels(route)
        histogram.observe(seconds)

    def observe_rows(self, route: str, rows: int) -> None:
        if self._fast is not None:
            self._fast.rows(route, rows)
            return
        histogram = self._rows_children.get(route)
        if histogram is None:
            histogram = self._rows_children[route] = self.rows.labels(route)
        histogram.observe(rows)

    def set_models(self, roles: dict[str, tuple[str, str]]) -> None:
        """Which versions are loaded: role -> (model name, version); a version that left drops to 0
        (multiprocess files keep every series, so it is zeroed, not removed)."""
        now = {(name, version, role) for role, (name, version) in roles.items()}
        for labels in self._model_labels - now:
            self.model_info.labels(*labels).set(0)
        for labels in now:
            self.model_info.labels(*labels).set(1)
        self._model_labels = now

    def exposition(self) -> bytes:
        """The text a Prometheus scrape gets."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class RequestSeries:
    """The per-request series of one process as plain numbers (no lock, no label lookup: the event
    loop is the only writer), turned into Prometheus families when scraped. About a microsecond
    per request, against ~10 for three locked prometheus_client metrics."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int, str], int] = {}
        self.latency: dict[str, list[float]] = {}  # route -> [count per bucket ..., +Inf count, sum]
        self.row_counts: dict[str, list[float]] = {}

    def request(self, route: str, status: int, version: str, seconds: float) -> None:
        key = (route, status, version)
        self.counts[key] = self.counts.get(key, 0) + 1
        _add(self.latency, route, LATENCY_BUCKETS, seconds)

    def rows(self, route: str, rows: int) -> None:
        _add(self.row_counts, route, ROW_BUCKETS, rows)

    def describe(self) -> list:
        return []  # collected on demand only

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(*REQUESTS, labels=["route", "status", "model_version"])
        by_class: dict[tuple[str, str, str], int] = {}
        for (route, status, version), n in list(self.counts.items()):
            key = (route, _status_class(status), version)
            by_class[key] = by_class.get(key, 0) + n
        for labels, n in by_class.items():
            requests.add_metric(list(labels), n)
        yield requests
        yield _histogram(*LATENCY, self.latency, LATENCY_BUCKETS)
        yield _histogram(*ROWS, self.row_counts, ROW_BUCKETS)


def _add(table: dict[str, list[float]], route: str, buckets: tuple[float, ...], value: float) -> None:
    counts = table.get(route)
    if counts is None:
        counts = table[route] = [0.0] * (len(buckets) + 2)
    counts[bisect_left(buckets, value)] += 1
    counts[-1] += value


def _histogram(name: str, documentation: str, table: dict[str, list[float]], buckets: tuple[float, ...]) -> Any:
    family = HistogramMetricFamily(name, documentation, labels=["route"])
    for route, counts in list(table.items()):
        cumulative, running = [], 0.0
        for bound, n in zip([*map(str, buckets), "+Inf"], counts[:-1], strict=True):
            running += n
            cumulative.append((bound, running))
        family.add_metric([route], cumulative, counts[-1])
    return family
