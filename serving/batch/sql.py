"""Tables and queries through SQLAlchemy, with PostgreSQL's COPY on the hot paths.

Any SQLAlchemy URL works (PostgreSQL and AWS RDS with `?sslmode=require`, SQLite, ...). On
PostgreSQL rows are read with `COPY (query) TO STDOUT` and upserted with `COPY` into a temporary
table and one `INSERT ... ON CONFLICT`; elsewhere pandas and SQLAlchemy do both. Every call opens
its own connection from a per-process pool (`pool_pre_ping`), so a retried call after a server
restart starts clean.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from models.faults import describe
from serving.batch.objects import BatchError

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy

# PostgreSQL type OIDs -> how the CSV of COPY is read back
_PG_BOOL, _PG_INTS, _PG_FLOATS = {16}, {20, 21, 23}, {700, 701, 1700}
_PG_TEXT, _PG_TIMES, _PG_TIMES_TZ = {18, 19, 25, 1042, 1043}, {1082, 1114}, {1184}


def is_sql_url(text: str) -> bool:
    return "://" in text and not text.startswith(("s3://", "file://")) and text.split("://")[0].replace("+", "").isalnum()


@cache
def engine(url: str) -> sqlalchemy.Engine:
    """One pooled engine per URL and process."""
    import sqlalchemy

    try:
        return sqlalchemy.create_engine(url, pool_pre_ping=True)
    except Exception as e:
        raise BatchError(f"{safe_url(url)}: not a usable SQLAlchemy URL: {describe(e)}") from None


def quote(url: str, name: str) -> str:
    """A (schema-qualified) table or column name quoted for the URL's dialect."""
    prep = engine(url).dialect.identifier_preparer
    return ".".join(prep.quote(part) for part in name.split("."))


def relation(url: str, table: str | None, query: str | None) -> str:
    """The rows to read as a SELECT."""
    return f"SELECT * FROM {quote(url, table)}" if table else str(query).strip().rstrip(";")


def is_postgres(url: str) -> bool:
    return engine(url).dialect.name == "postgresql"


def has_table(url: str, table: str) -> bool:
    import sqlalchemy

    schema, _, name = table.rpartition(".")
    return sqlalchemy.inspect(engine(url)).has_table(name, schema=schema or None)


def columns(url: str, select: str, what: str) -> list[str]:
    """The column names of a SELECT (runs it with no rows); a database error is a BatchError."""
    import sqlalchemy

    try:
        with engine(url).connect() as conn:
            return list(conn.execute(sqlalchemy.text(f"SELECT * FROM ({select}) AS s WHERE 1 = 0")).keys())
    except BatchError:
        raise
    except Exception as e:
        raise BatchError(f"{what}: {db_message(e)}") from None


def read(url: str, select: str, names: Sequence[str], *, where: str = "", params: dict[str, Any] | None = None,
         order_by: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """Columns `names` of the SELECT's rows (optionally filtered, ordered, limited) as one frame."""
    cols = ", ".join(quote(url, n) for n in names)
    sql = f"SELECT {cols} FROM ({select}) AS s{f' WHERE {where}' if where else ''}"
    if order_by:
        sql += f" ORDER BY {quote(url, order_by)}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    if is_postgres(url):
        return _copy_out(url, sql, params or {})
    import pandas as pd
    import sqlalchemy

    with engine(url).connect() as conn:
        return pd.read_sql(sqlalchemy.text(sql), conn, params=params or {})


def stream(url: str, select: str, names: Sequence[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The SELECT's rows in chunks, through a server-side cursor (no key to page on)."""
    import pandas as pd
    import sqlalchemy

    cols = ", ".join(quote(url, n) for n in names)
    with engine(url).connect().execution_options(stream_results=True) as conn:
        yield from pd.read_sql(sqlalchemy.text(f"SELECT {cols} FROM ({select}) AS s"), conn, chunksize=chunk_rows)


def _copy_out(url: str, sql: str, params: dict[str, Any]) -> pd.DataFrame:
    """COPY (sql) TO STDOUT as CSV, read back with the column types the server reports."""
    import pandas as pd

    raw = engine(url).raw_connection()
    try:
        with contextlib.closing(raw.cursor()) as cur:
            pyformat = sql.replace("%", "%%")
            for name in params:  # SQLAlchemy's :name -> psycopg2's %(name)s
                pyformat = pyformat.replace(f":{name}", f"%({name})s")
            bound = cur.mogrify(pyformat, params).decode()
            cur.execute(f"SELECT * FROM ({bound}) AS s WHERE 1 = 0")
            types = {d[0]: d[1] for d in cur.description}  # (name, type OID, ...)
            buffer = io.BytesIO()
            cur.copy_expert(f"COPY ({bound}) TO STDOUT WITH (FORMAT csv, HEADER true)", buffer)
        raw.commit()
    finally:
        raw.close()
    buffer.seek(0)
    dtype: dict[str, Any] = {}
    dates: list[str] = []
    bools: list[str] = []
    for name, oid in types.items():
        if oid in _PG_INTS:
            dtype[name] = "Int64"
        elif oid in _PG_FLOATS:
            dtype[name] = "float64"
        elif oid in _PG_TEXT or oid in _PG_BOOL:
            dtype[name] = object
            if oid in _PG_BOOL:
                bools.append(name)
        elif oid in _PG_TIMES or oid in _PG_TIMES_TZ:
            dtype[name] = object
            dates.append(name)
    frame = pd.read_csv(buffer, dtype=dtype, keep_default_na=False, na_values=[""])
    for name in bools:
        frame[name] = frame[name].map({"t": True, "f": False}).astype("boolean")
    for name in dates:
        frame[name] = pd.to_datetime(frame[name], utc=types[name] in _PG_TIMES_TZ, format="ISO8601")
    ints = [n for n, t in dtype.items() if t == "Int64" and not frame[n].isna().any()]
    if ints:  # plain int64 where no value is missing: keys compare and hash fast
        frame[ints] = frame[ints].astype("int64")
    return frame


# -- writing -----------------------------------------------------------------------------
def sql_type(dtype) -> Any:
    """The SQLAlchemy column type for a pandas dtype."""
    import pandas as pd
    import sqlalchemy

    if pd.api.types.is_bool_dtype(dtype):
        return sqlalchemy.Boolean()
    if pd.api.types.is_integer_dtype(dtype):
        return sqlalchemy.BigInteger()
    if pd.api.types.is_float_dtype(dtype):
        return sqlalchemy.Double()
    if isinstance(dtype, pd.DatetimeTZDtype):
        return sqlalchemy.DateTime(timezone=True)
    if pd.api.types.is_datetime64_dtype(dtype):
        return sqlalchemy.DateTime()
    return sqlalchemy.Text()


def create_table(url: str, table: str, frame: pd.DataFrame, key: str | None) -> None:
    """Create `table` with one typed column per frame column (primary key `key`) if missing; if it
    exists, every frame column must be in it."""
    import sqlalchemy

    schema, _, name = table.rpartition(".")
    if has_table(url, table):
        existing = {c["name"] for c in sqlalchemy.inspect(engine(url)).get_columns(name, schema=schema or None)}
        missing = [c for c in frame.columns if c not in existing]
        if missing:
            raise BatchError(f"--output-table {table}: the table exists without column(s) {', '.join(missing)}; "
                             "write to a new table or add them")
        return
    meta = sqlalchemy.MetaData()
    sqlalchemy.Table(name, meta, *(sqlalchemy.Column(str(c), sql_type(frame[c].dtype), primary_key=(c == key), autoincrement=False)
                                   for c in frame.columns), schema=schema or None)
    meta.create_all(engine(url))


def write(url: str, table: str, frame: pd.DataFrame, key: str | None) -> None:
    """Insert the rows in one transaction; with a key, a row whose key exists replaces it."""
    if frame.empty:
        return
    if is_postgres(url):
        _copy_upsert(url, table, frame, key)
        return
    import sqlalchemy

    schema, _, name = table.rpartition(".")
    target = sqlalchemy.Table(name, sqlalchemy.MetaData(), schema=schema or None, autoload_with=engine(url))
    rows = _records(frame)
    with engine(url).begin() as conn:
        if key is None:
            conn.execute(target.insert(), rows)
            return
        if engine(url).dialect.name != "sqlite":
            raise BatchError(f"--key: upserts into {engine(url).dialect.name} are not supported; use PostgreSQL or SQLite")
        from sqlalchemy.dialects.sqlite import insert

        statement = insert(target)
        update = {c: statement.excluded[c] for c in frame.columns if c != key}
        conn.execute(statement.on_conflict_do_update(index_elements=[key], set_=update), rows)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    import pandas as pd

    out = frame.astype(object).where(frame.notna(), None)
    for c in frame.columns:
        if isinstance(frame[c].dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(frame[c].dtype):
            out[c] = [v.to_pydatetime() if v is not None else None for v in out[c]]
    return out.to_dict("records")


def _copy_upsert(url: str, table: str, frame: pd.DataFrame, key: str | None) -> None:
    target = quote(url, table)
    cols = ", ".join(quote(url, str(c)) for c in frame.columns)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f%z")
    buffer.seek(0)
    raw = engine(url).raw_connection()
    try:
        with contextlib.closing(raw.cursor()) as cur:
            if key is None:
                cur.copy_expert(f"COPY {target} ({cols}) FROM STDIN WITH (FORMAT csv)", buffer)
            else:
                cur.execute(f"CREATE TEMP TABLE workbench_batch_rows (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DROP")
                cur.copy_expert(f"COPY workbench_batch_rows ({cols}) FROM STDIN WITH (FORMAT csv)", buffer)
                update = ", ".join(f"{quote(url, str(c))} = EXCLUDED.{quote(url, str(c))}" for c in frame.columns if c != key)
                cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM workbench_batch_rows "
                            f"ON CONFLICT ({quote(url, key)}) DO UPDATE SET {update}")
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def db_message(e: BaseException) -> str:
    """The database's own first line (e.g. `relation "x" does not exist`), without SQLAlchemy's wrapping."""
    orig = getattr(e, "orig", None)
    return describe(orig) if orig is not None else describe(e)


def safe_url(url: str) -> str:
    """The URL without its password."""
    try:
        import sqlalchemy

        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the database URL"
