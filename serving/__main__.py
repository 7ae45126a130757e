"""`python -m serving`: run the API with uvicorn (host, port, workers from the environment)."""

from __future__ import annotations

import sys

from models.errors import ExitCode


def main() -> int:
    import uvicorn

    from serving.settings import ServingSettings

    s = ServingSettings()
    # Each worker process loads the model once; workers and replicas share no state.
    uvicorn.run("serving.app:app", host=s.serving_host, port=s.serving_port, workers=s.serving_workers,
                log_level="warning", access_log=False)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
