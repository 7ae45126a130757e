"""Serving reliability under a champion change: 8 keep-alive clients on `POST /predict` for 60 s;
halfway, `@champion` moves from version 1 to version 2 in the registry and the server is told to
`/reload` (with the admin token). Goals: 0 failed requests, every answer from version 1 or 2 (and
both seen), resident memory growth under 5% from the 10th to the 60th second.

    python benchmarks/serving_reliability.py [--quick] [--seconds 60]

The server is `python -m serving` with its defaults (metrics and access log on), one worker, one
TensorFlow thread, serving `models:/bench@champion` from a registry made for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).with_name("serving.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its servers, registry and THREADS settings (applied on import)

TOKEN = "bench-token"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def load(port: int, raw: bytes, seconds: float, connections: int, events) -> tuple[Counter, Counter, int]:
    """(statuses, answering versions, connection errors) over `seconds`; `events` runs beside."""
    deadline = time.perf_counter() + seconds
    statuses: Counter = Counter()
    versions: Counter = Counter()
    broken = [0]

    async def client() -> None:
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                while time.perf_counter() < deadline:
                    status, body = await _answer(reader, writer, raw)
                    statuses[status] += 1
                    start = body.find(b'"model_version":"')
                    versions[body[start + 17:body.find(b'"', start + 17)].decode() if start >= 0 else "?"] += 1
                writer.close()
            except (OSError, asyncio.IncompleteReadError):
                broken[0] += 1

    await asyncio.gather(*(client() for _ in range(connections)), events())
    return statuses, versions, broken[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 s, memory from the 2nd second")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    seconds = 8.0 if args.quick else args.seconds
    first_rss_at = 2.0 if args.quick else 10.0
    import psutil
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _, data, v1 = bench.train_model(workdir)
        _, _, v2 = bench.train_model(workdir, seed=1, name="model2")
        tracking = bench.make_registry(workdir, [v1, v2])
        port = bench.free_port()
        server = bench.start("ours", port, v1, {"MLFLOW_TRACKING_URI": tracking, "SERVING_MODEL_URI": "models:/bench@champion",
                                                "SERVING_ADMIN_TOKEN": TOKEN})
        process = psutil.Process(server.pid)
        raw = bench.request_bytes("ours", port, [float(v) for v in data.x_test[0]])
        rss: dict[str, float] = {}
        reload_answer: list[str] = []

        async def events() -> None:
            await asyncio.sleep(first_rss_at)
            rss["first"] = process.memory_info().rss
            await asyncio.sleep(seconds / 2 - first_rss_at)
            MlflowClient(tracking).set_registered_model_alias("bench", "champion", "2")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/reload", data=b"", method="POST",
                                             headers={"authorization": f"Bearer {TOKEN}"})
            answer = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=120).read().decode())
            reload_answer.append(answer)
            await asyncio.sleep(max(0.0, seconds / 2 - 0.5))
            rss["last"] = process.memory_info().rss

        try:
            asyncio.run(bench.throughput(port, raw, 8, 1.0))  # warm-up
            statuses, versions, broken = asyncio.run(load(port, raw, seconds, 8, events))
        finally:
            bench.os.killpg(server.pid, 15)
            server.wait(timeout=60)
    total = sum(statuses.values())
    failed = total - statuses[200] + broken
    growth = rss["last"] / rss["first"] - 1
    print(f"{total} requests in {seconds:g} s with 8 connections; statuses {dict(statuses)}; connection errors {broken}")
    print(f"answers by version: {dict(versions)}; reload: {reload_answer[0] if reload_answer else 'none'}")
    print(f"resident memory: {rss['first'] / 2**20:.1f} MiB at {first_rss_at:g} s -> {rss['last'] / 2**20:.1f} MiB at the end")
    print(f"headline: failed requests = {failed} (goal 0); versions {sorted(versions)} (goal ['1', '2']); "
          f"memory growth = {100 * growth:+.2f}% (goal < 5%); server exit code {server.returncode} (goal 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
