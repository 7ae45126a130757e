"""What a model will cost a client of the API, measured on the API itself: the app (serving.app)
on a loopback port, in a thread of this process, answering with whichever model it was last
handed, and POST /predict timed over one keep-alive HTTP connection, the way a client sees it.

A study measures each trial's network here before training (the `latency_p50_ms` and
`latency_batch64_ms` an objective, a constraint or `registry.limits` can use), so the figure it
records is the one the registered model shows once served (benchmarks/trial_cost.py compares
the two); the forward pass alone is a few microseconds of a ~0.3 ms request.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from models.contract import ModelContract
from models.inference import Latency, compile_forward
from serving.model import LoadedModel
from serving.store import ResolvedModel, ServingError

if TYPE_CHECKING:
    from models import DataSpec
    from models.tabular import TableEncoder

_WARM = 5  # requests before timing: first-call costs are not the steady state


class ServingProbe:
    """The API in a thread of this process, on 127.0.0.1 and a free port; `measure` times it."""

    def __init__(self, *, start_timeout: float = 30.0) -> None:
        import uvicorn

        from serving.app import create_app
        from serving.settings import ServingSettings
        from serving.versions import ModelSet

        self.models = ModelSet.fixed(None)
        # The served app's defaults (metrics on), without its access log (it would print a line a request).
        settings = ServingSettings(serving_access_log=False, serving_model_uri=None, serving_shadow_alias=None,
                                   serving_poll_seconds=0.0, serving_model_versions=[])
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        # Trials come minutes apart: the connection stays open between them (uvicorn closes an idle one after 5 s).
        config = uvicorn.Config(create_app(settings, self.models), log_config=None, log_level="warning", access_log=False,
                                lifespan="on", timeout_keep_alive=24 * 3600)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="serving-probe")
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServingError("the serving probe did not start (its app on a loopback port)")
            time.sleep(0.005)
        self._client = Client("127.0.0.1", self.port)

    def measure(self, model: LoadedModel, body_one: bytes, body_batch: bytes, *, budget_seconds: float = 0.05,
                max_calls: int = 100) -> Latency:
        """Median milliseconds of POST /predict with each body (one row, 64 rows), `model` answering."""
        from serving.versions import Served

        self.models.served = Served(model)
        return Latency(self._client.median_ms("/predict", body_one, budget_seconds, max_calls),
                       self._client.median_ms("/predict", body_batch, budget_seconds, max_calls))

    def close(self) -> None:
        self._client.close()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


class Client:
    """One keep-alive HTTP/1.1 connection timing POST requests (the probe's, and the benchmark's
    against a served process: the same client on both sides of the comparison)."""

    def __init__(self, host: str, port: int) -> None:
        self._connection = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, path: str, body: bytes) -> bytes:
        try:
            response = self._send(path, body)
        except (http.client.HTTPException, OSError):  # the server closed an idle connection: a new one
            self._connection.close()
            response = self._send(path, body)
        answer = response.read()
        if response.status != 200:
            raise ServingError(f"POST {path} answered {response.status}: {answer[:300]!r}")
        return answer

    def _send(self, path: str, body: bytes) -> http.client.HTTPResponse:
        self._connection.request("POST", path, body, {"content-type": "application/json"})
        return self._connection.getresponse()

    def median_ms(self, path: str, body: bytes, budget_seconds: float, max_calls: int) -> float:
        """Median wall time of the request: at least 5 timed after the warm-up, more while the budget lasts."""
        for _ in range(_WARM):
            self.post(path, body)
        times: list[float] = []
        deadline = time.perf_counter() + budget_seconds
        while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < deadline):
            start = time.perf_counter()
            self.post(path, body)
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000.0

    def close(self) -> None:
        self._connection.close()


def predict_bodies(rows: np.ndarray, table: TableEncoder | None = None) -> tuple[bytes, bytes]:
    """POST /predict bodies of one row and of 64 rows: `instances` of model inputs, or for a
    mixed-type table's model (which takes raw records) its typical record (models.tabular)."""
    if table is not None:
        record = table.typical_record()
        return json.dumps({"records": [record]}).encode(), json.dumps({"records": [record] * 64}).encode()
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    batch = np.resize(x, (64, x.shape[1])) if len(x) < 64 else x[:64]
    return json.dumps({"instances": x[:1].tolist()}).encode(), json.dumps({"instances": batch.tolist()}).encode()


_PROBE: ServingProbe | None = None
_PROBE_LOCK = threading.Lock()


def probe() -> ServingProbe:
    """This process's probe, started on first use."""
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            _PROBE = ServingProbe()
        return _PROBE


def serving_costs(network: Any, spec: DataSpec, rows: np.ndarray) -> dict[str, float]:
    """What serving this Keras network will cost: `latency_p50_ms` and `latency_batch64_ms` of
    POST /predict on the API (one row, 64 rows; the forward pass it will be served with: the
    numpy program for a dense network), and `model_bytes`, the bytes of its weights."""
    contract = ModelContract.from_spec(spec)
    width = contract.table.width if contract.table is not None else len(contract.feature_names)
    compiled = compile_forward(network, width, verify=False)
    model = LoadedModel(ResolvedModel("probe:", None, None, None, None), contract.task, contract.feature_names,
                        contract.class_labels, compiled.forward, n_outputs=compiled.n_outputs, table=contract.table)
    one, batch = predict_bodies(rows, contract.table)
    size = sum(int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize for w in network.weights)
    return {**probe().measure(model, one, batch).as_metrics(), "model_bytes": float(size)}
