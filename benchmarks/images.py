"""Images benchmark: size, container start to `/ready`, and requests/s, side by side in one run.

  size            each target's image (goal: the numpy serving image at most 500 MB; the
                  TensorFlow serving image before this split measured 2.7 GB)
  start to ready  `run -d` of the serving image until `/ready` answers, against the TensorFlow
                  serving image on the same volume and model, rounds interleaved (goal: <= 3 s;
                  12.4 s measured before)
  requests/s      single-row `POST /predict` at 8 keep-alive connections (benchmarks/serving.py's
                  raw socket client), rounds interleaved, for: the numpy image, the TensorFlow
                  image, this tree's `python -m serving` natively, and the baseline's (`--baseline
                  REF`, default the last commit before the numpy image: a git worktree of it, same
                  venv, same model folder) natively (goal: the numpy image >= its requests/s)

    python benchmarks/images.py [--quick] [--baseline REF]

The images must be built (scripts/images.sh build). A tiny study run by the workbench image
registers the model in a fresh volume first. Servers run one worker with one thread for
TensorFlow and BLAS (OMP_NUM_THREADS=1, TF_NUM_*_THREADS=1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import THREADS, free_port, request_bytes, throughput  # noqa: E402

IMAGES: dict[str, str] = {}  # target -> image name (scripts/images.sh tags), filled by main()
ENGINE: list[str] = []
BEFORE = "372683e"  # the last commit with one TensorFlow serving image (today's server, before the split)
ROW = [float(v) for v in range(1, 31)]  # breast_cancer: 30 features


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"{' '.join(args[:4])} ...: {done.stderr[-2000:]}")
    return done.stdout.strip()


def wait_ready(port: int, started: float, limit: float = 180) -> float:
    while time.perf_counter() - started < limit:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).read()
            return time.perf_counter() - started
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing answered /ready on {port} in {limit} s")


def container(target: str, data: Path, port: int) -> tuple[str, float]:
    name = f"bench-{target}-{port}"
    env = [x for k, v in THREADS.items() for x in ("-e", f"{k}={v}")]
    started = time.perf_counter()
    sh(*ENGINE, "run", "-d", "--init", "--network", "host", "--name", name, "-v", f"{data}:/data",
       "-e", f"SERVING_PORT={port}", *env, IMAGES[target])
    return name, wait_ready(port, started)


def native(code: Path, model_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, **THREADS, "PYTHONPATH": str(code), "SERVING_MODEL_URI": str(model_dir),
           "SERVING_PORT": str(port), "SERVING_WORKERS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "serving"], cwd=code, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_ready(port, time.perf_counter())
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, short windows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="throughput window per contender and round")
    parser.add_argument("--baseline", default=BEFORE, help=f"the commit whose `python -m serving` is today's (default {BEFORE})")
    args = parser.parse_args()
    IMAGES.update(line.split("=") for line in sh("bash", str(ROOT / "scripts" / "images.sh"), "tags").split())
    ENGINE.append(sh("bash", str(ROOT / "scripts" / "images.sh"), "engine"))
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "scripts" / "containers.conf"))
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    data = work / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    print(f"engine: {ENGINE[0]}; servers: 1 worker, {THREADS}")

    print("\nimage sizes")
    sizes = {}
    for target, image in IMAGES.items():
        sizes[target] = int(sh(*ENGINE, "image", "inspect", image, "--format", "{{.Size}}")) / 1e6
        print(f"  {target:<11} {image:<18} {sizes[target]:8.0f} MB")

    print("\nregistering a model: a 2-trial study in the workbench image ...", flush=True)
    sh(*ENGINE, "run", "--rm", "--init", "--network", "host", "-v", f"{data}:/data", IMAGES["workbench"],
       "configs/breast_cancer.yaml", "--n-trials", "2", "--set", "training.epochs=2")
    model_dir = next(p.parent for p in data.rglob("MLmodel") if (p.parent / "network.npz").is_file())

    print("\ncontainer start to /ready (s)")
    starts: dict[str, list[float]] = {"serving": [], "serving-tf": []}
    for _ in range(max(rounds, 2)):
        for target in starts:
            name, seconds_to_ready = container(target, data, free_port())
            starts[target].append(seconds_to_ready)
            sh(*ENGINE, "rm", "-f", name)
    for target, values in starts.items():
        print(f"  {target:<11} median {statistics.median(values):5.2f}  runs {' '.join(f'{v:.2f}' for v in values)}")

    baseline = work / "baseline"
    sh("git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline)
    servers: dict[str, int] = {}
    cleanup = []
    try:
        for target in ("serving", "serving-tf"):
            port = free_port()
            name, _ = container(target, data, port)
            cleanup.append(lambda n=name: sh(*ENGINE, "rm", "-f", n, check=False))
            servers[f"image {target}"] = port
        for label, code in (("native this tree", ROOT), (f"native {args.baseline}", baseline)):
            port = free_port()
            proc = native(code, model_dir, port)
            cleanup.append(proc.kill)
            servers[label] = port
        rps: dict[str, list[float]] = {k: [] for k in servers}
        for port in servers.values():  # warm-up
            asyncio.run(throughput(port, request_bytes("ours", port, ROW), 8, 0.5))
        for _ in range(rounds):
            for name, port in servers.items():
                done, errors = asyncio.run(throughput(port, request_bytes("ours", port, ROW), 8, seconds))
                if errors:
                    raise SystemExit(f"{name}: {errors} failed requests")
                rps[name].append(done / seconds)
        print("\nrequests/s, single-row POST /predict, 8 connections")
        for name, values in rps.items():
            print(f"  {name:<24} median {statistics.median(values):7.0f}  rounds {' '.join(f'{v:.0f}' for v in values)}")
    finally:
        for step in cleanup:
            step()
        sh("git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline), check=False)
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(rps["image serving"]) / statistics.median(rps[f"native {args.baseline}"])
    start = statistics.median(starts["serving"])
    print(f"\nnumpy serving image: {sizes['serving']:.0f} MB (goal <= 500), start to ready {start:.2f} s (goal <= 3), "
          f"requests/s {ratio:.2f}x the baseline's native server (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
