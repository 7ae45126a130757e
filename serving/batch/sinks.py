"""Where a batch job's predictions go, and which rows they already hold.

- `FileSink`: one CSV/Parquet file (local or S3), staged and put in place when the job ends.
- `FolderSink`: a folder or S3 prefix, one output part per input part, each put in place atomically
  when the part is complete (a killed job leaves no half part behind).
- `TableSink`: a SQL table, created with typed columns when missing; each chunk is one transaction,
  an upsert on the key when there is one.

`done()` reads back the keys a model version has already scored, which is what makes a rerun score
each row exactly once. Errors (rows that cannot be scored) go beside the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.batch import objects, sql
from serving.batch.objects import BatchError, Folder, fmt_of, is_s3
from serving.batch.sources import file_chunks

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.parquet as pq

    from serving.batch.sources import Part

MODEL_NAME, MODEL_VERSION, SCORED_AT = "model_name", "model_version", "scored_at"


class FileWriter:
    """Appends chunks to a local CSV or Parquet file."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self._csv_started = path, fmt, False
        self._parquet: pq.ParquetWriter | None = None  # opened with the first chunk's schema

    def write(self, frame: pd.DataFrame) -> None:
        if self.fmt == "csv":
            frame.to_csv(self.path, mode="a" if self._csv_started else "w", header=not self._csv_started, index=False)
            self._csv_started = True
            return
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            # Dictionary pages only where values repeat (labels, model, time): trying them on
            # unique floats and ids costs 4x the write.
            repeat = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype) or c == SCORED_AT]
            self._parquet = pq.ParquetWriter(self.path, table.schema, use_dictionary=repeat)
        self._parquet.write_table(table)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()


class FileSink:
    """All predictions in one file; it appears (atomically) when the job has finished."""

    idempotent = False  # a retried part would append its rows twice
    parallel_parts = False  # the parts are appended to one file, in order

    def __init__(self, uri: str) -> None:
        self.uri, self.fmt = uri, fmt_of(uri) or "parquet"
        self._stage: contextlib.ExitStack | None = None
        self._writer: FileWriter | None = None

    def describe(self) -> str:
        return self.uri

    def prepare(self, sample: pd.DataFrame) -> None:
        pass

    def done(self, key: str, since: str | None, name: str, version: str) -> pd.DataFrame:
        raise BatchError("--key: incremental scoring needs --output to be a folder, an s3:// prefix or a table "
                         "(a single file cannot be appended to atomically)")

    def begin(self) -> None:
        self._stage = contextlib.ExitStack()
        path = self._stage.enter_context(objects.staged(self.uri))
        self._writer = FileWriter(path, self.fmt)

    @contextlib.contextmanager
    def part(self, part: Part, stamp: str) -> Iterator[Any]:
        assert self._writer is not None, "begin() first"
        yield self._writer

    def finish(self, ok: bool) -> None:
        """Put the file in place (ok) or drop it."""
        assert self._stage is not None and self._writer is not None
        self._writer.close()
        if ok:
            self._stage.close()
        else:
            self._stage.__exit__(BatchError, BatchError("job failed"), None)

    def errors_uri(self, stamp: str) -> str:
        return self.uri + ".errors.csv"

    def write_errors(self, frame: pd.DataFrame, uri: str) -> None:
        write_csv(frame, uri)


class FolderSink:
    """One output part per input part in a folder or under an S3 prefix."""

    idempotent = True  # a retried part is written again from the start
    parallel_parts = True  # one file each

    def __init__(self, uri: str) -> None:
        self.folder = Folder.parse(uri)
        if not is_s3(uri):
            Path(self.folder.uri).mkdir(parents=True, exist_ok=True)
        self.stamped = False

    def describe(self) -> str:
        return self.folder.uri + "/"

    def prepare(self, sample: pd.DataFrame) -> None:
        pass

    def done(self, key: str, since: str | None, name: str, version: str) -> pd.DataFrame:
        """Keys (and since values) this model version has scored, from every finished part."""
        import pandas as pd

        self.stamped = True  # incremental parts carry the run's stamp: a rerun never overwrites one
        columns = [key, *([since] if since else []), MODEL_NAME, MODEL_VERSION]
        frames = []
        for name_ in self.folder.names():
            with objects.local_copy(self.folder.child(name_)) as path:
                for chunk in file_chunks(path, fmt_of(name_) or "parquet", columns, 1_000_000):
                    mine = (chunk[MODEL_NAME].astype(str) == name) & (chunk[MODEL_VERSION].astype(str) == version)
                    frames.append(chunk.loc[mine, columns[:-2]])
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns[:-2])

    def begin(self) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass

    def part_uri(self, part: Part, stamp: str) -> str:
        stem = Path(part.name).stem if fmt_of(part.name) else f"part-{part.index:05d}"
        return self.folder.child(f"{stem}-{stamp}.{part.fmt}" if self.stamped else f"{stem}.{part.fmt}")

    @contextlib.contextmanager
    def part(self, part: Part, stamp: str) -> Iterator[FileWriter]:
        with objects.staged(self.part_uri(part, stamp)) as path:
            writer = FileWriter(path, part.fmt)
            try:
                yield writer
            finally:
                writer.close()

    def errors_uri(self, stamp: str) -> str:
        return self.folder.child(f"_errors-{stamp}.csv")

    def write_errors(self, frame: pd.DataFrame, uri: str) -> None:
        write_csv(frame, uri)


class TableWriter:
    def __init__(self, url: str, table: str, key: str | None) -> None:
        self.url, self.table, self.key = url, table, key

    def write(self, frame: pd.DataFrame) -> None:
        sql.write(self.url, self.table, frame, self.key)


class TableSink:
    """Predictions in a SQL table: upserted on the key (one row per key), else appended."""


    def __init__(self, url: str, table: str | None, key: str | None) -> None:
        if not table:
            raise BatchError("--output: a database URL needs --output-table NAME")
        self.url, self.table, self.key = url, table, key
        sql.engine(url)

    @property
    def idempotent(self) -> bool:
        return self.key is not None

    @property
    def parallel_parts(self) -> bool:
        """Parts may be written side by side, except into SQLite (one writer at a time)."""
        return not self.url.startswith("sqlite")

    def describe(self) -> str:
        return f"{sql.safe_url(self.url)} {self.table}"

    def prepare(self, sample: pd.DataFrame) -> None:
        sql.create_table(self.url, self.table, sample, self.key)

    def done(self, key: str, since: str | None, name: str, version: str) -> pd.DataFrame:
        import pandas as pd

        columns = [key, *([since] if since else [])]
        if not sql.has_table(self.url, self.table):
            return pd.DataFrame(columns=columns)
        where = f"{sql.quote(self.url, MODEL_NAME)} = :name AND {sql.quote(self.url, MODEL_VERSION)} = :version"
        return sql.read(self.url, f"SELECT * FROM {sql.quote(self.url, self.table)}", columns, where=where,
                        params={"name": name, "version": version})

    def begin(self) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass

    @contextlib.contextmanager
    def part(self, part: Part, stamp: str) -> Iterator[TableWriter]:
        yield TableWriter(self.url, self.table, self.key)

    def errors_uri(self, stamp: str) -> str:
        return f"{self.table}_errors"

    def write_errors(self, frame: pd.DataFrame, uri: str) -> None:
        if sql.is_sql_url(uri) or "/" in uri or fmt_of(uri):
            write_csv(frame, uri)
            return
        sql.create_table(self.url, uri, frame, None)
        sql.write(self.url, uri, frame, None)


def write_csv(frame: pd.DataFrame, uri: str) -> None:
    with objects.staged(uri) as path:
        frame.to_csv(path, index=False)


def open_sink(uri: str, table: str | None, key: str | None) -> FileSink | FolderSink | TableSink:
    """The sink `--output` (with `--output-table` for a database) names."""
    if sql.is_sql_url(uri):
        return TableSink(uri, table, key)
    if table:
        raise BatchError("--output-table: --output must then be a database URL (e.g. postgresql+psycopg2://...)")
    if fmt_of(uri):
        return FileSink(uri)
    if Path(uri).suffix and not is_s3(uri):
        raise BatchError(f"--output: must be a .csv or .parquet file, a folder, an s3:// prefix or a database URL, got {uri!r}")
    return FolderSink(uri)
