"""What a batch job reads, split into parts: files (local or S3) or the rows of a SQL table or query.

A part is the unit of work of both engines: one input file, or one range of keys of a SQL source
(`(lo, hi]`, about `--chunk-rows` rows), or a whole SQL result streamed in chunks when there is no
key. A part is a small picklable value: a Dask worker reads it on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.batch import objects, sql
from serving.batch.objects import BatchError, Folder, fmt_of, is_s3

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


FIRST_CHUNK_ROWS = 10_000  # rows of a Parquet file's first chunk (the later ones have --chunk-rows)
WHOLE_GROUP_CHUNKS = 4  # a Parquet row group of up to this many chunks' rows is decoded in one go


@dataclass(frozen=True)
class Part:
    """One unit of input. `skip` holds keys already scored (set by the plan)."""

    index: int
    name: str
    uri: str  # a file's URI, or the SQL URL
    select: str | None = None  # SQL: the rows
    key: str | None = None  # SQL: the key column the range is on
    lo: Any = None  # SQL: keys > lo (None: from the first)
    hi: Any = None  # SQL: keys <= hi (None: to the last)
    skip: np.ndarray | None = field(default=None, compare=False)

    @property
    def fmt(self) -> str:
        return fmt_of(self.name) or "parquet"


def read_part(part: Part, columns: Sequence[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The part's rows (only `columns`), in chunks of at most `chunk_rows`, with the types the
    file or the database gives (a CSV's empty cell is missing; a column with a stray word stays
    text, and scoring reports that row)."""
    if part.select is not None:
        if part.key is None:
            yield from sql.stream(part.uri, part.select, columns, chunk_rows)
            return
        where, params = key_range(part)
        yield sql.read(part.uri, part.select, columns, where=where, params=params, order_by=part.key)
        return
    with objects.local_copy(part.uri) as path:
        yield from file_chunks(path, part.fmt, list(columns), chunk_rows)


def key_range(part: Part) -> tuple[str, dict[str, Any]]:
    """The WHERE clause and parameters of a SQL part's key range."""
    assert part.key is not None
    column = sql.quote(part.uri, part.key)
    clauses, params = [], {}
    if part.lo is not None:
        clauses.append(f"{column} > :lo")
        params["lo"] = part.lo
    if part.hi is not None:
        clauses.append(f"{column} <= :hi")
        params["hi"] = part.hi
    return " AND ".join(clauses), params


def file_chunks(path: Path, fmt: str, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pandas as pd

    if fmt == "csv":
        yield from pd.read_csv(path, usecols=columns, chunksize=chunk_rows)
        return
    import pyarrow.parquet as pq

    # The first chunk small: the scoring thread waits for it alone (a 100k-row first chunk took
    # ~45 ms of a 1M-row job, a 10k-row one ~15), and the later ones are read while it scores the
    # one before. The rows of the first chunk are decoded twice (the later reader skips them):
    # ~8 ms in the reader thread, cheaper than joining small batches into chunks (+50 ms).
    parquet = pq.ParquetFile(path, memory_map=True)
    first = next(parquet.iter_batches(batch_size=max(1, min(chunk_rows, FIRST_CHUNK_ROWS)), columns=columns), None)
    if first is None:
        return
    yield _pandas(first)
    skip = first.num_rows
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if skip >= rows:
            skip -= rows
            continue
        pieces: Iterator[Any]
        if rows <= WHOLE_GROUP_CHUNKS * chunk_rows:
            # A row group decoded at once, then cut: 0.157 s per million rows of 30 float
            # columns against 0.189 s in `chunk_rows` batches (pandas' default Parquet file).
            table = parquet.read_row_group(group, columns=columns)
            pieces = (table.slice(start, chunk_rows) for start in range(skip, rows, chunk_rows))
        else:
            pieces = _skipped(parquet.iter_batches(batch_size=chunk_rows, row_groups=[group], columns=columns), skip)
        skip = 0
        for piece in pieces:
            if piece.num_rows:
                yield _pandas(piece)


def _skipped(batches: Iterator[Any], skip: int) -> Iterator[Any]:
    """The record batches without their first `skip` rows."""
    for batch in batches:
        if skip:
            cut = min(skip, batch.num_rows)
            batch, skip = batch.slice(cut), skip - cut
        yield batch


def _pandas(arrow: Any) -> pd.DataFrame:
    """An Arrow table or batch as a frame of one block per column: numeric columns without
    missing values stay in Arrow's buffers, and pandas does not copy them all into one 2-D block
    (per million rows of 31 columns, with the float32 features taken from it: 0.20 s against 0.25 s)."""
    return arrow.to_pandas(split_blocks=True)


def _file_header(path: Path, fmt: str) -> list[str]:
    import pandas as pd

    if fmt == "csv":
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


class FileSource:
    """One file, or every CSV/Parquet file in a folder or under an S3 prefix (one part each)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if fmt_of(uri):
            if not is_s3(uri) and not Path(uri).is_file():
                raise BatchError(f"--input: file not found, got {uri!r}")
            self.uris = [uri]
        else:
            folder = Folder.parse(uri)
            if not is_s3(uri) and not Path(uri).is_dir():
                raise BatchError(f"--input: must be a .csv or .parquet file, a folder or an s3:// prefix, got {uri!r}")
            self.uris = [folder.child(n) for n in folder.names()]
            if not self.uris:
                raise BatchError(f"--input: no .csv or .parquet files in {uri!r}")

    @property
    def multi_part(self) -> bool:
        return not fmt_of(self.uri)

    def describe(self) -> str:
        return self.uri

    def parts(self) -> list[Part]:
        return [Part(i, Path(u).name if not is_s3(u) else u.rsplit("/", 1)[1], u) for i, u in enumerate(self.uris)]

    def header(self) -> list[str]:
        """The columns every part has; parts with different columns are an error."""
        first: list[str] | None = None
        for part in self.parts():
            with objects.local_copy(part.uri) as path:
                names = _file_header(path, part.fmt)
            if first is None:
                first = names
            elif set(names) != set(first):
                diff = sorted(set(names) ^ set(first))
                raise BatchError(f"--input: the parts have different columns: {part.name} differs from "
                                 f"{self.parts()[0].name} in {', '.join(diff[:10])}")
        assert first is not None
        return first

    def sample(self, columns: Sequence[str], n: int) -> pd.DataFrame:
        """The first rows of the first part (their types)."""
        return next(read_part(self.parts()[0], columns, n))

    def keys(self, key: str, since: str | None) -> pd.DataFrame:
        """Every row's key (and since value) with its part index, typed as the parts are read."""
        import pandas as pd

        frames = []
        columns = [key, *([since] if since else [])]
        for part in self.parts():
            for chunk in read_part(part, columns, 1_000_000):
                frames.append(chunk.assign(_part=part.index))
        return pd.concat(frames, ignore_index=True)

    def with_skips(self, keys: pd.DataFrame, todo: np.ndarray, key: str) -> tuple[list[Part], int]:
        """The parts that still have rows to score, each knowing the keys it may skip; and how
        many rows are skipped in all."""
        done = keys[~todo]
        parts = []
        for part in self.parts():
            mine = keys["_part"].to_numpy() == part.index
            if (todo & mine).any():
                parts.append(replace(part, skip=done.loc[done["_part"] == part.index, key].to_numpy()))
        return parts, int((~todo).sum())


class SqlSource:
    """The rows of a table (`--input-table`) or a query (`--input-query`) at a SQLAlchemy URL."""

    multi_part = False

    def __init__(self, url: str, table: str | None, query: str | None) -> None:
        if (table is None) == (query is None):
            raise BatchError("--input: a database URL needs exactly one of --input-table or --input-query")
        self.url, self.table = url, table
        sql.engine(url)
        if table is not None and not sql.has_table(url, table):
            raise BatchError(f"--input-table: no table {table!r} at {sql.safe_url(url)}")
        self.select = sql.relation(url, table, query)
        self.what = "--input-table" if table else "--input-query"

    def describe(self) -> str:
        return f"{sql.safe_url(self.url)} {self.table or 'query'}"

    def header(self) -> list[str]:
        return sql.columns(self.url, self.select, self.what)

    def parts(self) -> list[Part]:
        return [Part(0, "rows", self.url, select=self.select)]

    def sample(self, columns: Sequence[str], n: int) -> pd.DataFrame:
        """The first rows (their types)."""
        return sql.read(self.url, self.select, columns, limit=n)

    def keys(self, key: str, since: str | None) -> pd.DataFrame:
        frame = sql.read(self.url, self.select, [key, *([since] if since else [])], order_by=key)
        return frame.assign(_part=0)

    def key_parts(self, keys: pd.DataFrame, todo: np.ndarray, key: str, chunk_rows: int) -> tuple[list[Part], int]:
        """Ranges of about `chunk_rows` keys still to score (keys sorted), each knowing the keys it
        may skip; and how many rows are skipped in all."""
        import numpy as np

        values = keys[key].to_numpy()  # in the database's order (its collation decides the ranges too)
        positions = np.flatnonzero(todo)
        parts: list[Part] = []
        for start in range(0, len(positions), chunk_rows):
            first, last = positions[start], positions[min(start + chunk_rows, len(positions)) - 1]
            lo = values[first - 1] if first > 0 else None  # keys (lo, hi]: no row outside it is to do
            hi = values[last]
            window = slice(first, last + 1)
            parts.append(Part(len(parts), f"keys ({plain(lo)}, {plain(hi)}]", self.url, select=self.select, key=key,
                              lo=plain(lo), hi=plain(hi), skip=values[window][~todo[window]]))
        return parts, int((~todo).sum())


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value a database driver binds."""
    return value.item() if hasattr(value, "item") else value


def open_source(uri: str, table: str | None, query: str | None) -> FileSource | SqlSource:
    """The source `--input` (with `--input-table`/`--input-query` for a database) names."""
    if sql.is_sql_url(uri):
        return SqlSource(uri, table, query)
    if table or query:
        raise BatchError("--input-table/--input-query: --input must then be a database URL (e.g. postgresql+psycopg2://...)")
    return FileSource(uri)
