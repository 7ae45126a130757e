"""Serving benchmark, side by side in one run on loopback, one server worker each:

  HTTP  single-row latency p50/p99 with 1 client, requests/s with 8 concurrent keep-alive
        connections; our servers and the no-op interleaved (latency in blocks of 25 requests,
        throughput in 1 s slices, the order rotating) so that the ratios with goals are taken
        under the same load of this shared machine (each ratio with a goal is the median over
        rounds of that round's ratio; our servers are started afresh for every round, so that no
        one process's memory layout or hash seed decides a ratio); the slow peers after them;
        per round:
          ours          `POST /predict` of `python -m serving` (metrics on, access log on: defaults)
          ours-nometrics  the same with SERVING_METRICS=false (goal: ours >= 0.95x its req/s)
          ours-shadow   the same with SERVING_SHADOW_ALIAS=challenger at 10% (goal: p50 <= 1.1x ours)
          ours-v2       `POST /v2/models/bench/infer` (Open Inference Protocol, JSON) on the `ours`
                        server (goal: p50 <= 1.2x /predict's)
          mlflow        `mlflow models serve --env-manager local`
          mlserver      MLServer + mlserver-mlflow (the Open Inference Protocol reference server) on
                        the same registered model, in its own venv (.workbench/peers/mlserver, made
                        on first use: it pins an older FastAPI); `--no-mlserver` leaves it out
          noop          a FastAPI endpoint returning a constant (this machine's HTTP floor; goal:
                        ours >= 0.5x its req/s in every round)
  Batch rows/s on generated rows without file I/O: our batch path (LoadedModel.predict in
        chunks) vs MLflow pyfunc predict (Keras Model.predict) vs a plain numpy forward pass of the
        same weights (the floor); and with file I/O: `python -m serving.batch` Parquet -> Parquet.

    python benchmarks/serving.py [--quick] [--no-mlserver]

Our servers serve `models:/bench@champion` from a registry made for the run (version 1 champion,
version 2 challenger). The client is a raw asyncio socket client (pre-encoded request bytes,
keep-alive), so it is not the bottleneck; its CPU seconds and the server's are printed next to
requests/s. Servers run with one TensorFlow thread (TF_NUM_INTRAOP_THREADS=1,
TF_NUM_INTEROP_THREADS=1, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
os.environ.update(THREADS)


def noop_server(port: int) -> None:
    """The HTTP floor: a FastAPI endpoint that parses nothing and returns a constant."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    body = b'{"predictions":[0]}'

    @app.post("/predict")
    async def predict() -> Response:
        return Response(body, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def train_model(workdir: Path, seed: int = 0, name: str = "model"):
    import keras

    from models import FAMILIES, load_dataset
    from models.training import fit
    from studies.tracking import save_model

    data = load_dataset(name="breast_cancer", seed=0)
    keras.utils.set_random_seed(seed)
    model = FAMILIES["mlp"].build({"n_layers": 2, "units": [64, 32]}, data.spec)
    fit(model, data, epochs=3, batch_size=64)
    path = save_model(model, data.spec, {"optuna.study_name": "bench", "optuna.trial_number": str(seed)})
    target = workdir / name
    path.rename(target)
    return model, data, target


def make_registry(workdir: Path, model_dirs: list[Path], name: str = "bench") -> str:
    """A registry for the run: each folder a version of `name`; v1 @champion, v2 @challenger.
    Returns its tracking URI."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    client.create_registered_model(name)
    for folder in model_dirs:
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(folder), "model")
        client.set_terminated(run.info.run_id)
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")
    if len(model_dirs) > 1:
        client.set_registered_model_alias(name, "challenger", "2")
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MLSERVER_VENV = ROOT / ".workbench" / "peers" / "mlserver"
MLSERVER_PINS = ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "tensorflow-cpu==2.21.0", "keras==3.15.1", "mlflow==3.17.2"]


def mlserver_python() -> Path:
    """The peer venv's python, made on first use (MLServer pins FastAPI < 0.116: not our venv)."""
    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / ".installed").exists():
        print(f"making the MLServer peer venv in {MLSERVER_VENV} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *MLSERVER_PINS], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"could not install the MLServer peer:\n{done.stderr[-3000:]}")
        (MLSERVER_VENV / ".installed").touch()
    return python


def start(name: str, port: int, model_dir: Path, env: dict[str, str] | None = None,
          workdir: Path | None = None) -> subprocess.Popen:
    """One server: ours (SERVING_MODEL_URI=model_dir unless env says otherwise), mlflow, mlserver or noop."""
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
    env = {**os.environ, **THREADS, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **(env or {})}
    if name.startswith("ours"):
        cmd = [sys.executable, "-m", "serving"]
        env = {"SERVING_MODEL_URI": str(model_dir), **env, "SERVING_PORT": str(port), "SERVING_WORKERS": "1"}
    elif name == "mlflow":
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1", "-w", "1"]
    elif name == "mlserver":
        assert workdir is not None
        folder = workdir / "mlserver"
        folder.mkdir(exist_ok=True)
        (folder / "settings.json").write_text(json.dumps({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                                                          "host": "127.0.0.1", "parallel_workers": 0}))
        (folder / "model-settings.json").write_text(json.dumps({"name": "bench", "implementation": "mlserver_mlflow.MLflowRuntime",
                                                                "parameters": {"uri": str(model_dir)}}))
        python = mlserver_python()
        env["PATH"] = f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        cmd = [str(python.parent / "mlserver"), "start", str(folder)]
    else:
        cmd = [sys.executable, __file__, "--noop-server", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    probe = f"http://127.0.0.1:{port}/" + ("ready" if name.startswith("ours") else "ping" if name == "mlflow" else
                                           "v2/health/ready" if name == "mlserver" else "docs")
    for _ in range(900):
        try:
            urllib.request.urlopen(probe, timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} server did not start")


def request_bytes(name: str, port: int, row: list[float]) -> bytes:
    if name == "mlflow":
        path, payload = "/invocations", {"inputs": [row]}
    elif name == "mlserver":
        path, payload = "/v2/models/bench/infer", {"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32",
                                                               "data": row}]}
    elif name == "ours-v2":
        path, payload = "/v2/models/bench/infer", {"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32",
                                                               "data": row}]}
    else:
        path, payload = "/predict", {"instances": [row]}
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def throughput(port: int, raw: bytes, connections: int, seconds: float) -> tuple[int, int]:
    deadline = time.perf_counter() + seconds
    done, errors = [0], [0]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            if await _one(reader, writer, raw) == 200:
                done[0] += 1
            else:
                errors[0] += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return done[0], errors[0]


async def latencies(port: int, raw: bytes, n: int, max_seconds: float = 10.0) -> list[float]:
    """Up to n sequential single-row requests (fewer for a slow server: at most max_seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(out) < n and (len(out) < 20 or time.perf_counter() < deadline):
        t = time.perf_counter()
        await _one(reader, writer, raw)
        out.append((time.perf_counter() - t) * 1000)
    writer.close()
    return out


async def paired_latencies(targets: dict[str, tuple[int, bytes]], n: int, block: int = 25) -> dict[str, list[float]]:
    """n single-row requests to each server, interleaved in blocks of `block` back-to-back requests
    (the first of each block, to a server that sat idle, not counted), the order rotating: every
    contender's p50 is taken under the same moment-to-moment load of this shared machine, so the
    ratios of p50s compare like with like."""
    names = list(targets)
    conns = {name: await asyncio.open_connection("127.0.0.1", port) for name, (port, _) in targets.items()}
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(-(-n // block)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            reader, writer = conns[name]
            for j in range(block + 1):
                t = time.perf_counter()
                await _one(reader, writer, targets[name][1])
                if j:
                    out[name].append((time.perf_counter() - t) * 1000)
    for _, writer in conns.values():
        writer.close()
    return out


def cpu_seconds(proc: subprocess.Popen) -> float:
    import psutil

    p = psutil.Process(proc.pid)
    total = sum(p.cpu_times()[:2])
    for child in p.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def numpy_forward(model):
    """The same weights as plain numpy: the floor for inference."""
    import numpy as np

    steps = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Normalization":
            mean = np.asarray(layer.mean, dtype=np.float32).reshape(1, -1)
            scale = np.maximum(np.sqrt(np.asarray(layer.variance, dtype=np.float32)), 1e-7).reshape(1, -1)
            steps.append(lambda x, m=mean, s=scale: (x - m) / s)
        elif kind == "Dense":
            w, b = (np.asarray(v, dtype=np.float32) for v in layer.get_weights())
            act = layer.activation.__name__
            steps.append(lambda x, w=w, b=b: x @ w + b)
            if act == "sigmoid":
                steps.append(lambda x: 1 / (1 + np.exp(-x)))
            elif act == "relu":
                steps.append(lambda x: np.maximum(x, 0))
        elif kind == "Activation":
            if layer.activation.__name__ == "relu":
                steps.append(lambda x: np.maximum(x, 0))

    def forward(x):
        for step in steps:
            x = step(x)
        return x

    return forward


def bench_batch(model, model_dir: Path, data, rows: int, workdir: Path) -> list[tuple[str, float]]:
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from serving.model import from_directory
    from serving.store import ResolvedModel

    rng = np.random.default_rng(0)
    x = (data.x_train[rng.integers(0, len(data.x_train), rows)] * rng.normal(1, 0.05, (rows, data.x_train.shape[1]))).astype(np.float32)
    ours = from_directory(model_dir, ResolvedModel(str(model_dir), None, None, None, None))
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    floor = numpy_forward(model)
    np.testing.assert_allclose(floor(x[:100]).ravel(), np.asarray(ours.forward(x[:100])).ravel(), atol=1e-4)
    chunk = 100_000
    contenders = {
        "ours (LoadedModel.predict_arrays, 100k chunks)": lambda: [ours.predict_arrays(x[i:i + chunk]) for i in range(0, rows, chunk)],
        "numpy forward pass (floor)": lambda: [floor(x[i:i + chunk]) for i in range(0, rows, chunk)],
        "mlflow pyfunc predict": lambda: pyfunc.predict(x),
    }
    results: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(2):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            results[name].append(rows / (time.perf_counter() - t))
    out = [(k, statistics.median(v)) for k, v in results.items()]
    parquet = workdir / "rows.parquet"
    pd.DataFrame(x, columns=list(data.spec.feature_names)).to_parquet(parquet)
    env = {**os.environ, **THREADS}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "serving.batch", "--input", str(parquet), "--output", str(workdir / "out.parquet"),
                    "--model", str(model_dir), "--no-tracking"], cwd=ROOT, env=env, check=True, capture_output=True)
    out.append(("ours with I/O (python -m serving.batch, process incl. start-up)", rows / (time.perf_counter() - t)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: short windows, 1 round, 20k rows, no MLServer")
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput window per contender and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-mlserver", action="store_true", help="leave out the MLServer peer")
    parser.add_argument("--noop-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.noop_server:
        noop_server(args.noop_server)
        return 0
    if args.quick:
        args.seconds, args.rounds, args.rows, args.no_mlserver = 1.5, 1, 20_000, True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, data, model_dir = train_model(workdir)
        _, _, second_dir = train_model(workdir, seed=1, name="model2")
        tracking = make_registry(workdir, [model_dir, second_dir])
        row = [float(v) for v in data.x_test[0]]
        registry_env = {"MLFLOW_TRACKING_URI": tracking, "SERVING_MODEL_URI": "models:/bench@champion"}
        servers_env = {  # the pairs with goals sit next to each other in every round
            "ours-nometrics": {**registry_env, "SERVING_METRICS": "false"},
            "ours": registry_env,
            "noop": None,
            "ours-shadow": {**registry_env, "SERVING_SHADOW_ALIAS": "challenger", "SERVING_SHADOW_FRACTION": "0.1"},
            "mlflow": None,
            **({} if args.no_mlserver else {"mlserver": None}),
        }
        ports = {n: free_port() for n in servers_env}
        ports["ours-v2"] = ports["ours"]  # the v2 route of the same server
        names = [*servers_env]
        names.insert(names.index("ours") + 1, "ours-v2")
        servers = {}
        try:
            for n, env in servers_env.items():
                servers[n] = start(n, ports[n], model_dir, env, workdir)
            servers["ours-v2"] = servers["ours"]

            def restart_ours() -> None:
                """Fresh processes for our servers (one process's memory layout and hash seed can
                shift its speed by several per cent: each round draws new ones)."""
                ours = [n for n in servers_env if n.startswith("ours")]
                for n in ours:
                    os.killpg(servers[n].pid, 15)
                    servers[n].wait(timeout=30)
                for n in ours:
                    servers[n] = start(n, ports[n], model_dir, servers_env[n], workdir)
                servers["ours-v2"] = servers["ours"]

            stats = _http_rounds(names, ports, servers, row, args, restart_ours)
        finally:
            for n, proc in servers.items():
                if n != "ours-v2" and proc.poll() is None:
                    os.killpg(proc.pid, 15)
                    proc.wait(timeout=30)
        print(f"HTTP, single row, 1 server worker each, {args.rounds} round(s) x {args.seconds:g} s, 8 connections")
        print(f"{'server':<15} {'req/s (median; all)':>30} {'p50 ms':>8} {'p99 ms':>8} {'server CPU s':>13} {'client CPU s':>13}")
        med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in stats.items()}
        for n in names:
            all_rps = ", ".join(f"{v:.0f}" for v in stats[n]["rps"])
            print(f"{n:<15} {med[n]['rps']:10.0f} ({all_rps:>17}) {med[n]['p50']:8.2f} {med[n]['p99']:8.2f} "
                  f"{med[n]['server_cpu']:13.1f} {med[n]['client_cpu']:13.1f}")
        print(f"\nBatch, {args.rows:,} generated rows (median of 2)")
        batch = bench_batch(model, model_dir, data, args.rows, workdir)
        floor = dict(batch)["numpy forward pass (floor)"]
        for name, rps in batch:
            print(f"  {name:<62} {rps:12,.0f} rows/s  ({rps / floor:.2f} x floor)")
        ours_batch = dict(batch)["ours (LoadedModel.predict_arrays, 100k chunks)"]
        peers = f"ours/mlflow req/s = {med['ours']['rps'] / med['mlflow']['rps']:.1f}x"
        if "mlserver" in med:
            peers += (f"; ours/mlserver req/s = {med['ours']['rps'] / med['mlserver']['rps']:.2f}x, "
                      f"p50 mlserver/ours = {med['mlserver']['p50'] / med['ours']['p50']:.0f}x")

        def paired(a: str, b: str, key: str, goal: str) -> str:
            """The median over rounds of a/b (both measured in the same interleaved round), per round."""
            ratios = [x / y for x, y in zip(stats[a][key], stats[b][key], strict=True)]
            return f"{statistics.median(ratios):.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)}; goal {goal})"

        print(f"\nmetrics on/off req/s = {paired('ours', 'ours-nometrics', 'rps', '>= 0.95')}; "
              f"p50 shadow 10%/none = {paired('ours-shadow', 'ours', 'p50', '<= 1.1')}; "
              f"p50 v2/predict = {paired('ours-v2', 'ours', 'p50', '<= 1.2')}; {peers}")
        print(f"ours/noop req/s = {paired('ours', 'noop', 'rps', '>= 0.50 in every round')}; "
              f"p50 ours/noop = {paired('ours', 'noop', 'p50', '<= 1.5')}; "
              f"batch ours/floor = {ours_batch / floor:.2f} (goal >= 0.50)")
    return 0


def _http_rounds(names: list[str], ports: dict[str, int], servers: dict[str, subprocess.Popen], row: list[float],
                 args: argparse.Namespace, restart_ours) -> dict[str, dict[str, list[float]]]:
    """Per round, with our servers started afresh (but in the first round), for our servers and the
    no-op (the contenders with goals): single-row latencies
    interleaved in blocks, then throughput in 1 s slices interleaved the same way (rotating order),
    so that each pair's ratio is taken under the same moment-to-moment load of this shared
    machine; then the slow peers, one after another."""
    stats: dict[str, dict[str, list[float]]] = {n: {"rps": [], "p50": [], "p99": [], "server_cpu": [], "client_cpu": []}
                                                for n in names}
    raws = {n: request_bytes(n, ports[n], row) for n in names}
    for n in names:  # warm-up
        asyncio.run(throughput(ports[n], raws[n], 8, 1.0))
    fast = [n for n in names if n.startswith("ours") or n == "noop"]
    n_latency = 200 if args.quick else 1000
    slice_seconds = min(1.0, args.seconds)
    slices = max(1, round(args.seconds / slice_seconds))
    for r in range(args.rounds):
        if r:
            restart_ours()
            for n in fast:  # warm-up of the new processes (and the no-op beside them)
                asyncio.run(throughput(ports[n], raws[n], 8, 1.0))
        lat = asyncio.run(paired_latencies({n: (ports[n], raws[n]) for n in fast}, n_latency))
        done = dict.fromkeys(names, 0)
        cpu = {n: [0.0, 0.0] for n in names}
        for k in range(slices):
            for n in fast[k % len(fast):] + fast[:k % len(fast)]:
                _measure(n, ports, raws, servers, slice_seconds, done, cpu)
        for n in names:
            if n not in fast:
                lat[n] = asyncio.run(latencies(ports[n], raws[n], n_latency))
                _measure(n, ports, raws, servers, args.seconds, done, cpu)
        for n in names:
            s, seconds = stats[n], slices * slice_seconds if n in fast else args.seconds
            s["rps"].append(done[n] / seconds)
            s["p50"].append(statistics.median(lat[n]))
            s["p99"].append(sorted(lat[n])[int(0.99 * len(lat[n])) - 1])
            s["server_cpu"].append(cpu[n][0])
            s["client_cpu"].append(cpu[n][1])
    return stats


def _measure(n: str, ports: dict[str, int], raws: dict[str, bytes], servers: dict[str, subprocess.Popen], seconds: float,
             done: dict[str, int], cpu: dict[str, list[float]]) -> None:
    """One throughput window of one contender, added to its count and CPU seconds."""
    cpu0, client0 = cpu_seconds(servers[n]), time.process_time()
    ok, errors = asyncio.run(throughput(ports[n], raws[n], 8, seconds))
    if errors:
        raise SystemExit(f"{n}: {errors} non-200 answers")
    done[n] += ok
    cpu[n][0] += cpu_seconds(servers[n]) - cpu0
    cpu[n][1] += time.process_time() - client0


if __name__ == "__main__":
    sys.exit(main())
