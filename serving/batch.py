"""`python -m serving.batch --input F --output G [--model URI]`: score a CSV/Parquet file in chunks.

Same loading and validation as the API. Memory stays flat: the input is read and the output
written one chunk at a time, in input order. Rows that cannot be scored (a missing or
non-numeric value, NaN/inf) are never dropped silently: they go to an errors file with their row
number and reason, and the exit code is 3 when there were any.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import ExitCode

if TYPE_CHECKING:
    import pyarrow.parquet as pq

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, type=Path, help="CSV or Parquet file with one column per feature")
    p.add_argument("--output", required=True, type=Path, help="where predictions go (.csv or .parquet)")
    p.add_argument("--model", help="model URI (default: SERVING_MODEL_URI, else the one registered model with a @champion)")
    p.add_argument("--errors", type=Path, help="invalid rows (default: <output>.errors.csv)")
    p.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (memory use scales with it)")
    p.add_argument("--keep", nargs="*", default=[], metavar="COLUMN", help="input columns to copy into the output (e.g. an id)")
    p.add_argument("--no-tracking", action="store_true", help="do not record the job as an MLflow run")
    return p


def _chunks(path: Path, columns: list[str], chunk_rows: int, *, raw: bool = False) -> Iterator:
    import pandas as pd

    if _FORMATS[path.suffix.lower()] == "csv":
        if raw:  # a table model: empty cells are missing values, its encoding judges each value
            yield from pd.read_csv(path, usecols=columns, chunksize=chunk_rows)
            return
        # Strings stay strings here so that a bad value is reported, not guessed.
        yield from pd.read_csv(path, usecols=columns, chunksize=chunk_rows, dtype=str, keep_default_na=False)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            yield batch.to_pandas()


def _header(path: Path) -> list[str]:
    import pandas as pd

    if _FORMATS[path.suffix.lower()] == "csv":
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def _total_rows(path: Path) -> int | None:
    if _FORMATS[path.suffix.lower()] == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


class _Writer:
    """Appends chunks to a CSV or Parquet file."""

    def __init__(self, path: Path) -> None:
        self.path, self.kind, self._csv_started = path, _FORMATS[path.suffix.lower()], False
        self._parquet: pq.ParquetWriter | None = None  # opened with the first chunk's schema

    def write(self, frame) -> None:
        if self.kind == "csv":
            frame.to_csv(self.path, mode="a" if self._csv_started else "w", header=not self._csv_started, index=False)
            self._csv_started = True
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()


def score_file(model, input_path: Path, output: Path, errors_path: Path, *, chunk_rows: int, keep: list[str],
               progress: bool = True) -> dict[str, float]:
    """Score every row; returns counts. Output rows keep the input order and carry their row number."""
    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    table = model.table
    columns = list(dict.fromkeys([*model.feature_names, *keep]))
    writer = _Writer(output)
    invalid_rows = 0
    errors_started = False
    start, offset = time.perf_counter(), 0
    bar = tqdm(total=_total_rows(input_path), unit="row", unit_scale=True, disable=not progress, file=sys.stderr)
    try:
        for chunk in _chunks(input_path, columns, chunk_rows, raw=table is not None):
            rows = np.arange(offset, offset + len(chunk))
            offset += len(chunk)
            if table is not None:
                features, wrong = table.encode_rows(chunk)
                ok = np.ones(len(chunk), dtype=bool)
                ok[list(wrong)] = False
                reasons = [f"{column!r}: {message}" for _, (column, message) in sorted(wrong.items())]
            else:
                features = chunk[model.feature_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
                ok = np.isfinite(features).all(axis=1)
                reasons = [_reason(model.feature_names, r) for r in chunk.loc[~ok, model.feature_names].itertuples(index=False)]
            if not ok.all():
                report = pd.DataFrame({"row": rows[~ok], "reason": reasons})
                report.to_csv(errors_path, mode="a" if errors_started else "w", header=not errors_started, index=False)
                errors_started = True
                invalid_rows += int((~ok).sum())
            if ok.any():
                predictions, probs = model.predict_arrays(features[ok])
                out = pd.DataFrame({"row": rows[ok]})
                for col in keep:
                    out[col] = chunk.loc[ok, col].to_numpy()
                out["prediction"] = predictions
                if probs is not None:
                    for j, label in enumerate(model.classes):
                        out[f"probability_{label}"] = probs[:, j].astype(np.float32)
                writer.write(out)
            bar.update(len(chunk))
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - start
    return {"rows_total": offset, "rows_scored": offset - invalid_rows, "rows_invalid": invalid_rows,
            "seconds": round(seconds, 3), "rows_per_second": round(offset / seconds, 1) if seconds else 0.0}


def _reason(names: list[str], values) -> str:
    import math

    for name, raw in zip(names, values, strict=True):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return f"{name!r} is not a number: {raw!r}"
        if not math.isfinite(value):
            return f"{name!r} must be a finite number, got {raw!r}"
    return "invalid row"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    for path, what in ((args.input, "--input"), (args.output, "--output")):
        if path.suffix.lower() not in _FORMATS:
            print(f"{what}: must be a .csv or .parquet file, got {str(path)!r}", file=sys.stderr)
            return ExitCode.USAGE
    if not args.input.is_file():
        print(f"--input: file not found, got {str(args.input)!r}", file=sys.stderr)
        return ExitCode.USAGE
    if args.chunk_rows < 1:
        print(f"--chunk-rows: must be >= 1, got {args.chunk_rows}", file=sys.stderr)
        return ExitCode.USAGE
    from serving.model import load
    from serving.settings import ServingSettings
    from serving.store import ServingError, Store

    settings = ServingSettings()
    store = Store.at(settings)
    try:
        uri = args.model or settings.serving_model_uri or store.default_uri()
        model = load(uri, store)
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    header = _header(args.input)
    keep = args.keep
    if model.table is not None:  # a table model's id columns travel with its predictions
        keep = list(dict.fromkeys([*(c for c in model.table.ids if c in header), *keep]))
    missing = [c for c in [*model.feature_names, *keep] if c not in header]
    if missing:
        print(f"--input: the file lacks column(s) {', '.join(missing[:10])} that the model needs", file=sys.stderr)
        return ExitCode.USAGE
    errors = args.errors or args.output.with_name(args.output.name + ".errors.csv")
    errors.unlink(missing_ok=True)
    counts = score_file(model, args.input, args.output, errors, chunk_rows=args.chunk_rows, keep=keep)
    r = model.resolved
    print(f"scored {counts['rows_scored']} of {counts['rows_total']} rows with {r.name or uri} v{r.version} "
          f"in {counts['seconds']} s ({counts['rows_per_second']} rows/s) -> {args.output}")
    if not args.no_tracking:
        try:
            store.log_batch_run(params={"input": args.input, "output": args.output, "model_uri": uri,
                                        "model_version": r.version, "chunk_rows": args.chunk_rows},
                                metrics=counts, tags={"workbench.job": f"batch-{args.input.name}",
                                                      "workbench.model_name": str(r.name), "workbench.model_version": str(r.version)})
        except Exception as e:  # the predictions are written; a tracking failure must not hide them
            print(f"warning: could not record the job in MLflow: {e}", file=sys.stderr)
    if counts["rows_invalid"]:
        print(f"{counts['rows_invalid']} invalid row(s) were not scored; see {errors}", file=sys.stderr)
        return ExitCode.INVALID_ROWS
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
