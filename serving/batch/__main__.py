"""`python -m serving.batch --input SRC --output DST [--model URI]`: score rows where they live.

SRC and DST: a CSV/Parquet file, a folder or `s3://bucket/prefix/` of such files (one output part
per input part), or a database URL with `--input-table`/`--input-query` and `--output-table`.
`--key id` scores only rows this model version has not scored yet (exactly once across reruns);
`--every 5m` repeats until SIGTERM; `--engine dask` runs the parts on a Dask cluster. Rows that
cannot be scored go to an errors output with their identity and reason (exit code 3).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from models.errors import ExitCode, WorkbenchError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__.splitlines()[0])
    io = p.add_argument_group("where the rows are")
    io.add_argument("--input", required=True, help="a .csv/.parquet file, a folder or s3://bucket/prefix/ of them, "
                    "or a SQLAlchemy URL (postgresql+psycopg2://user@host/db?sslmode=require, sqlite:///f.db)")
    io.add_argument("--input-table", help="with a database --input: the table to score")
    io.add_argument("--input-query", help="with a database --input: a SELECT whose rows to score")
    io.add_argument("--output", required=True, help="a .csv/.parquet file, a folder or s3:// prefix (one part per "
                    "input part), or a SQLAlchemy URL with --output-table")
    io.add_argument("--output-table", help="with a database --output: the table (created when missing)")
    io.add_argument("--errors", help="where invalid rows go (default: beside the output: <file>.errors.csv, "
                    "<folder>/_errors-<time>.csv, or the table <output-table>_errors)")
    p.add_argument("--model", help="model URI (default: SERVING_MODEL_URI, else the one registered model with a @champion)")
    p.add_argument("--keep", nargs="*", default=[], metavar="COLUMN", help="input columns to copy into the output (e.g. an id)")
    inc = p.add_argument_group("incremental")
    inc.add_argument("--key", help="a unique id column: score only the rows this model version has not scored yet")
    inc.add_argument("--since-column", help="with --key: also score again rows whose value here grew since they were scored")
    inc.add_argument("--rescore", action="store_true", help="with --key: score every row again")
    inc.add_argument("--every", help="repeat the job every interval (30s, 5m, 1h) until SIGTERM")
    run = p.add_argument_group("how it runs")
    run.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (memory use scales with it)")
    run.add_argument("--parts-at-once", type=int, default=2, help="--engine local: parts in flight (each holds a few "
                     "chunks); a single output file takes one at a time")
    run.add_argument("--engine", choices=("local", "dask"), default="local", help="one process, or the parts on Dask")
    run.add_argument("--scheduler", help="--engine dask: a running scheduler (tcp://host:8786); default: a local cluster")
    run.add_argument("--workers", type=int, default=2, help="--engine dask without --scheduler: worker processes")
    p.add_argument("--no-tracking", action="store_true", help="do not record the job as an MLflow run")
    return p


def _spec(args: argparse.Namespace):
    from serving.batch.job import JobSpec

    return JobSpec(input=args.input, output=args.output, input_table=args.input_table, input_query=args.input_query,
                   output_table=args.output_table, errors=args.errors, model_uri=args.model, key=args.key,
                   since=args.since_column, keep=tuple(args.keep), chunk_rows=args.chunk_rows, rescore=args.rescore,
                   parts_at_once=args.parts_at_once)


def run_once(args: argparse.Namespace, store, stop: threading.Event) -> int:
    """Plan, run, write the errors, record the run; returns the exit code."""
    import pandas as pd

    from models.runtime import freeze_heap
    from serving.batch.job import Stopped, plan, run_local
    from serving.batch.sinks import FileSink

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    spec = _spec(args)
    start = time.perf_counter()
    p = plan(spec, store, stamp=stamp, distributed=args.engine == "dask")
    freeze_heap()  # the libraries and the model are loaded
    sink = p.task.sink
    errors_uri = spec.errors or sink.errors_uri(stamp)
    if isinstance(sink, FileSink) and not spec.errors and not errors_uri.startswith("s3://"):
        Path(errors_uri).unlink(missing_ok=True)  # a report from an earlier run must not look like this one's
    try:
        if args.engine == "dask":
            from serving.batch.cluster import run_dask

            results = run_dask(p, scheduler=args.scheduler, workers=args.workers, stop=stop)
        else:
            results = run_local(p, stop)
    except Stopped as e:
        print(f"stopped by a signal: {e}; finished parts and committed chunks are kept, a rerun goes on from there",
              file=sys.stderr)
        return ExitCode.TERMINATED
    seconds = time.perf_counter() - start
    errors = [r.errors for r in results if r.errors is not None]
    invalid = sum(r.invalid for r in results)
    if errors:
        sink.write_errors(pd.concat(errors, ignore_index=True), errors_uri)
    counts = {"rows_read": sum(r.rows for r in results), "rows_scored": sum(r.scored for r in results),
              "rows_invalid": invalid, "rows_skipped": p.skipped, "parts": len(results),
              "part_retries": sum(r.retries for r in results), "seconds": round(seconds, 3)}
    counts["rows_per_second"] = round(counts["rows_read"] / seconds, 1) if seconds else 0.0
    r = p.model.resolved
    skipped = f", {p.skipped} already scored by this version" if spec.key else ""
    where = f" on the Dask cluster at {args.scheduler}" if args.engine == "dask" else ""
    print(f"scored {counts['rows_scored']} of {counts['rows_read']} rows{skipped} with {r.name or r.uri} v{r.version} "
          f"in {counts['seconds']} s ({counts['rows_per_second']} rows/s){where} -> {sink.describe()}", flush=True)
    if not args.no_tracking:
        try:
            store.log_batch_run(params={"input": p.source.describe(), "output": sink.describe(), "model_uri": p.task.model.uri,
                                        "model_version": r.version, "chunk_rows": spec.chunk_rows, "engine": args.engine,
                                        "parts_at_once": spec.parts_at_once if args.engine == "local" else None,
                                        "key": spec.key, "rescore": spec.rescore},
                                metrics=counts, tags={"workbench.job": f"batch-{Path(spec.input.rstrip('/')).name}",
                                                      "workbench.model_name": str(r.name),
                                                      "workbench.model_version": str(r.version)})
        except Exception as e:  # the predictions are written; a tracking failure must not hide them
            print(f"warning: could not record the job in MLflow: {e}", file=sys.stderr)
    if invalid:
        print(f"{invalid} invalid row(s) were not scored; see {errors_uri}", file=sys.stderr)
        return ExitCode.INVALID_ROWS
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    from models.faults import describe
    from serving.batch.schedule import parse_every, repeat, stop_on_signals
    from serving.settings import ServingSettings
    from serving.store import Store

    def guarded() -> int:
        try:
            return run_once(args, store, stop)
        except WorkbenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except Exception as e:  # a service that is down, a database error: one line, no traceback
            print(f"error: {describe(e)}", file=sys.stderr)
            return ExitCode.FAILURE

    try:
        every = parse_every(args.every) if args.every else None
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    store = Store.at(ServingSettings())
    with stop_on_signals() as stop, contextlib.ExitStack() as cluster:
        if args.engine == "dask" and not args.scheduler:  # started once: every run of `--every` joins it
            from serving.batch.cluster import local_cluster

            try:
                args.scheduler = cluster.enter_context(local_cluster(args.workers))
            except WorkbenchError as e:
                print(f"error: {e}", file=sys.stderr)
                return e.exit_code
            except Exception as e:
                print(f"error: --engine dask: cannot start a local cluster of {args.workers} worker(s): {describe(e)}",
                      file=sys.stderr)
                return ExitCode.FAILURE
        if every is None:
            return guarded()
        code = repeat(guarded, every, stop)
        return ExitCode.OK if stop.is_set() and code in (ExitCode.OK, ExitCode.INVALID_ROWS, ExitCode.TERMINATED) else code


if __name__ == "__main__":
    sys.exit(main())
