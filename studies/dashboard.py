"""`python -m studies.dashboard CONFIG`: optuna-dashboard on the study's storage.

The storage is found as `studies.run` finds it (--storage, $OPTUNA_STORAGE, study.storage, the
embedded SQLite file), so every study in it, Optuna and KerasTuner engine alike, shows side by
side. The same without this command: `optuna-dashboard <storage URL>`.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import ExitCode
from studies.cli import run_with_config, study_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.dashboard", parents=[study_flags()],
                                description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_with_config(args, lambda loaded: _serve(loaded, args))


def _serve(loaded, args: argparse.Namespace) -> int:
    import optuna
    import optuna_dashboard

    from studies.environment import Settings
    from studies.storage import open_storage, redact

    settings = Settings()
    url = settings.storage_url(args.storage, loaded.config.study.storage)
    storage = open_storage(url)  # checks the storage answers before the server starts
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"optuna-dashboard on {base}/dashboard  (storage {redact(url)}, {len(summaries)} studies)")
    for summary in summaries:
        mark = "  <- this config" if summary.study_name == loaded.study_name else ""
        print(f"  {summary.study_name:<32} {summary.n_trials:>5} trials  {base}/dashboard/studies/{summary._study_id}{mark}")
    if loaded.study_name not in {s.study_name for s in summaries}:
        print(f"  (no study named {loaded.study_name!r} yet: run `python -m studies.run {loaded.source}` first)")
    sys.stdout.flush()
    try:
        server = _make_server(optuna_dashboard.wsgi(storage), args.host, args.port)
    except OSError as e:  # the port is taken, the address is not ours
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return ExitCode.FAILURE
    _serve_until_signalled(server)
    return ExitCode.OK


def _make_server(app, host: str, port: int):
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Handler(WSGIRequestHandler):
        def address_string(self) -> str:  # no reverse DNS lookup per request
            return self.client_address[0]

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return make_server(host, port, app, Server, Handler)


def _serve_until_signalled(server) -> None:
    """Serve until SIGINT or SIGTERM, then finish the request in hand and close.

    optuna_dashboard.run_server stops on KeyboardInterrupt, but wsgiref's handler swallows one that
    lands while a request is served (its bare `except:`), and the server then serves on: Ctrl-C
    is taken as a stop request instead, which the serving loop sees between requests. A second
    one (a client that holds its request open) ends the process at once.
    """
    import os
    import signal
    import threading

    stopping = threading.Event()

    def stop(signum, frame) -> None:  # shutdown() waits for serve_forever, so not on this thread
        if stopping.is_set():
            os._exit(128 + signum)
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
