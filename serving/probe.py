"""What a model will cost a client of the API, measured on the API itself: the app (serving.app)
on a loopback port, in a thread of this process, answering with whichever model it was last
handed, and POST /predict timed over one keep-alive HTTP connection by a small client process
(serving.probe_client), the way a client sees it.

A study measures each trial's network here (the `latency_p50_ms` and
`latency_batch64_ms` an objective, a constraint or `registry.limits` can use), so the figure it
records is the one the registered model shows once served (benchmarks/trial_cost.py compares
the two); the forward pass alone is a few microseconds of a ~0.3 ms request.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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
        self._client = RemoteClient("127.0.0.1", self.port)

    def measure(self, model: LoadedModel, body_one: bytes, body_batch: bytes, *, budget_seconds: float = 0.1,
                max_calls: int = 15) -> Latency:
        """Median milliseconds of POST /predict with each body (one row, 64 rows; sent in turn),
        `model` answering. 15 calls of each (after 5 to warm up) cost a trial 11-17 ms, 30 calls
        29 ms. What moves the median is the machine's moment, not the count: over 40 probes of the
        breast-cancer MLP, twice, the one-row median varied by 19% and 19% (coefficient of
        variation) with 30 calls, 7% and 4% with 15, 14% and 10% with 10 (2026-12-06)."""
        from serving.versions import Served

        self.models.served = Served(model)
        one, batch = self._client.medians_ms("/predict", [body_one, body_batch], budget_seconds, max_calls)
        return Latency(one, batch)

    def confirm(self, model: LoadedModel, body_one: bytes, body_batch: bytes, *, bursts: int = 7,
                pause_seconds: float = 0.05) -> Latency:
        """The median over `bursts` measurements (`measure`), `pause_seconds` apart. One burst's
        median moves with the machine's moment: on these 2-core machines, 120 bursts of the
        breast-cancer MLP 0.1 s apart in one process ranged 0.24-0.56 ms around a median of
        0.34 ms, and the moment changes between bursts more than within one (2026-12-07). A trial
        pays for one burst; registering a model (studies.selection.promote) pays for several."""
        taken = []
        for i in range(bursts):
            if i:
                time.sleep(pause_seconds)
            taken.append(self.measure(model, body_one, body_batch))
        return Latency(float(np.median([t.p50_ms for t in taken])), float(np.median([t.batch64_ms for t in taken])))

    def close(self) -> None:
        self._client.close()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


class RemoteClient:
    """Times POST requests from its own small process (serving.probe_client): the same client for
    the probe and for a served process (benchmarks/trial_cost.py)."""

    def __init__(self, host: str, port: int) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "serving.probe_client", host, str(port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def medians_ms(self, path: str, bodies: list[bytes], budget_seconds: float, max_calls: int) -> list[float]:
        """Median milliseconds of POST `path` with each body, sent in turn (after a warm-up, as
        long as the budget lasts)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        command = {"path": path, "bodies": [body.decode() for body in bodies], "budget_seconds": budget_seconds,
                   "max_calls": max_calls}
        try:
            self._process.stdin.write(json.dumps(command) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except OSError as e:
            raise ServingError(f"the probe's client process is gone: {e}") from None
        if not line:
            raise ServingError(f"the probe's client process exited ({self._process.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise ServingError(f"POST {path} on the probe: {answer['error']}")
        return [float(ms) for ms in answer["median_ms"]]

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


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


def serving_costs(network: Any, spec: DataSpec, rows: np.ndarray, *, bursts: int = 1) -> dict[str, float]:
    """What serving this Keras network will cost: `latency_p50_ms` and `latency_batch64_ms` of
    POST /predict on the API (one row, 64 rows; the forward pass it will be served with: the
    numpy program for a dense network), and `model_bytes`, the bytes of its weights. One burst
    of requests (a trial), or the median of several (`ServingProbe.confirm`)."""
    contract = ModelContract.from_spec(spec)
    width = contract.table.width if contract.table is not None else len(contract.feature_names)
    compiled = compile_forward(network, width, verify=False)
    model = LoadedModel(ResolvedModel("probe:", None, None, None, None), contract.task, contract.feature_names,
                        contract.class_labels, compiled.forward, n_outputs=compiled.n_outputs, table=contract.table)
    one, batch = predict_bodies(rows, contract.table)
    size = sum(int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize for w in network.weights)
    return {**probe().confirm(model, one, batch, bursts=bursts).as_metrics(), "model_bytes": float(size)}
