"""`python -m serving`: run the API with uvicorn (host, port, workers, logs from the environment).

SIGTERM (or Ctrl-C) stops accepting connections, lets requests in flight finish (at most
SERVING_SHUTDOWN_SECONDS), runs the app's shutdown (the shadow's last evidence is logged) and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

from models.errors import ExitCode


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(ExitCode.OK)


def main() -> int:
    import uvicorn

    from serving.logs import uvicorn_log_config
    from serving.settings import ServingSettings

    s = ServingSettings()
    if s.serving_workers > 1 and s.serving_metrics and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker counts into files here; /metrics adds them up, whichever worker answers.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="workbench-metrics-")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    # found: this one, so the exit status is 0 rather than "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        # Each worker process loads the models once; workers and replicas share no state.
        uvicorn.run("serving.app:app", host=s.serving_host, port=s.serving_port, workers=s.serving_workers,
                    log_config=uvicorn_log_config(s.serving_log_format), log_level="warning", access_log=False,
                    timeout_graceful_shutdown=max(1, round(s.serving_shutdown_seconds)))
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
