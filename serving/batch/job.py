"""A batch job: its plan (which parts, which rows are already done) and the single-process engine.

`plan()` runs where the job starts: it opens the source and the sink, pins the model to one version,
checks the columns, and with a key reads every key once (unique, not null) and the keys this model
version has already scored, so that each part knows the rows it may skip. `run_part()` scores one
part and writes it: the one function both engines run (`cluster` runs it on Dask workers).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from models.faults import RetryLog, is_transient, retry_call
from models.runtime import freeze_heap
from serving.batch.objects import BatchError
from serving.batch.overlap import WriteBehind, ahead
from serving.batch.scoring import Identity, Inputs, model_inputs, sample_output, score_chunk
from serving.batch.sinks import FileSink, FolderSink, TableSink, open_sink
from serving.batch.sources import FileSource, Part, SqlSource, open_source, plain, read_part

if TYPE_CHECKING:
    import pandas as pd

    from serving.model import LoadedModel
    from serving.store import ResolvedModel, Store

PART_ATTEMPTS = 8  # a part whose database or S3 endpoint goes away (a restart) is read and written again
# Per process, the models loaded last (a Dask worker loads a model once; `--every` keeps its
# workers, and a moved alias loads a new version beside the old ones: the oldest are let go).
_MODELS: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()
MODELS_KEPT = 3


class Stopped(Exception):
    """SIGTERM arrived: the job stopped between chunks (nothing half-written is kept)."""


@dataclass(frozen=True)
class JobSpec:
    """What the command line asked for."""

    input: str
    output: str
    input_table: str | None = None
    input_query: str | None = None
    output_table: str | None = None
    errors: str | None = None
    model_uri: str | None = None
    key: str | None = None
    since: str | None = None
    keep: tuple[str, ...] = ()
    chunk_rows: int = 100_000
    rescore: bool = False
    parts_at_once: int = 2  # the single-process engine's parts in flight


@dataclass(frozen=True)
class PinnedModel:
    """A model version and where to fetch it: what a worker needs to load the same model."""

    uri: str  # models:/name/version, or the URI as given when it names no registry version
    tracking_uri: str
    registry_uri: str
    # Where the job's own process has the model's files, and what the registry said of them: a
    # worker on the same machine (the local cluster) loads them from there, without MLflow.
    folder: str | None = field(default=None, compare=False)
    resolved: ResolvedModel | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PartTask:
    """Everything a part needs besides the part itself (picklable, sent to Dask workers)."""

    model: PinnedModel
    sink: FolderSink | TableSink | FileSink
    columns: tuple[str, ...]
    identity: Identity
    chunk_rows: int
    stamp: str
    retry: bool


@dataclass
class PartResult:
    index: int
    name: str
    rows: int = 0
    scored: int = 0
    invalid: int = 0
    skipped: int = 0
    seconds: float = 0.0
    retries: int = 0
    errors: pd.DataFrame | None = None


@dataclass
class Plan:
    spec: JobSpec
    model: LoadedModel
    task: PartTask
    parts: list[Part]
    source: FileSource | SqlSource
    skipped: int = 0  # rows already scored by this model version (left out)


def pin(uri: str, store: Store) -> tuple[PinnedModel, LoadedModel]:
    """Resolve an alias once (every part then uses the same version) and load the model (a registry
    version already loaded in this process is reused: versions do not change)."""
    from serving.model import fetch

    resolved = store.resolve(uri)
    cache_key = (f"models:/{resolved.name}/{resolved.version}" if resolved.version else uri, store.tracking_uri,
                 store.registry_uri)
    if not resolved.version:  # not a registry version: its files may change, fetched each time
        _MODELS.pop(cache_key, None)
    model = _cached(cache_key, lambda: fetch(resolved, store))  # `--every`: a version is loaded once
    folder = str(model.folder) if model.folder is not None else None
    return PinnedModel(*cache_key, folder=folder, resolved=model.resolved), model


def worker_model(pinned: PinnedModel) -> LoadedModel:
    """The model in this process, loaded on first use: from the job's own files when this process
    sees them (the local cluster: no MLflow import, no registry call, no download; a cold job's
    workers were ready ~2-3 s sooner), else through MLflow."""
    from serving.model import from_directory, load
    from serving.store import ServingError, Store

    def fetched() -> LoadedModel:
        if pinned.folder is not None and pinned.resolved is not None and Path(pinned.folder).is_dir():
            try:
                return from_directory(Path(pinned.folder), pinned.resolved)
            except (OSError, ServingError):  # the job's process dropped the model (and its files) meanwhile
                pass
        return load(pinned.uri, Store(pinned.tracking_uri, pinned.registry_uri))

    cache_key = (pinned.uri, pinned.tracking_uri, pinned.registry_uri)
    fresh = cache_key not in _MODELS
    model = _cached(cache_key, fetched)
    if fresh:
        freeze_heap()  # the first model's heap stays out of full collections (once per process)
    return model


def _cached(key: tuple[str, str, str], load: Callable[[], LoadedModel]) -> LoadedModel:
    """The model under `key`, loaded when missing; the `MODELS_KEPT` used last stay."""
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    model = _MODELS[key] = load()
    while len(_MODELS) > MODELS_KEPT:
        _MODELS.popitem(last=False)
    return model


def plan(spec: JobSpec, store: Store, *, stamp: str, distributed: bool = False) -> Plan:
    """Open the source and sink, pin the model, check columns and keys, and list the parts to run."""
    import numpy as np

    if spec.chunk_rows < 1:
        raise BatchError(f"--chunk-rows: must be >= 1, got {spec.chunk_rows}")
    if spec.parts_at_once < 1:
        raise BatchError(f"--parts-at-once: must be >= 1, got {spec.parts_at_once}")
    if spec.since and not spec.key:
        raise BatchError("--since-column: needs --key (the since value is compared per key)")
    source = open_source(spec.input, spec.input_table, spec.input_query)
    sink = open_sink(spec.output, spec.output_table, spec.key)
    if distributed and isinstance(sink, FileSink):
        raise BatchError("--engine dask: writes one part per input part; --output must be a folder, an s3:// prefix or a table")
    pinned, model = pin(spec.model_uri or store.default_uri(), store)
    header = source.header()
    keep = list(spec.keep)
    if model.table is not None:  # a table model's id columns travel with its predictions
        keep = list(dict.fromkeys([*(c for c in model.table.ids if c in header), *keep]))
    carry = [c for c in dict.fromkeys([*([spec.since] if spec.since else []), *keep]) if c != spec.key]
    missing = [c for c in dict.fromkeys([*model.feature_names, *carry, *([spec.key] if spec.key else [])]) if c not in header]
    if missing:
        what = "--input-table" if spec.input_table else "--input-query" if spec.input_query else "--input"
        raise BatchError(f"{what}: the input lacks column(s) {', '.join(missing[:10])} that the job needs")
    columns = tuple(dict.fromkeys([*([spec.key] if spec.key else []), *model.feature_names, *carry]))
    identity = Identity(spec.key, "part" if source.multi_part else None, tuple(carry))
    task = PartTask(pinned, sink, columns, identity, spec.chunk_rows, stamp, retry=sink.idempotent)
    skipped = 0
    if spec.key is None:
        parts = source.parts()
    else:
        keys = source.keys(spec.key, spec.since)
        values = keys[spec.key]
        if values.isna().any():
            raise BatchError(f"--key {spec.key}: {int(values.isna().sum())} row(s) have no key; every row needs one")
        dupes = values[values.duplicated()]
        if len(dupes):
            raise BatchError(f"--key {spec.key}: not unique in the input: {dupes.nunique()} value(s) appear more than once, "
                             f"e.g. {plain(dupes.iloc[0])!r}")
        r = model.resolved
        done = None if spec.rescore else sink.done(spec.key, spec.since, str(r.name or r.uri), str(r.version or ""))
        todo = np.ones(len(keys), dtype=bool)
        if done is not None and len(done):
            done = done.astype({spec.key: keys[spec.key].dtype})  # e.g. ids read back from a CSV part
            merged = keys[[spec.key, *([spec.since] if spec.since else [])]].merge(
                done.drop_duplicates(spec.key, keep="last"), on=spec.key, how="left", suffixes=("", "_done"), indicator=True)
            was_done = (merged["_merge"] == "both").to_numpy().copy()
            if spec.since:  # a row changed since it was scored is scored again
                newer = (merged[spec.since] > merged[f"{spec.since}_done"]).fillna(False).to_numpy(dtype=bool)
                was_done &= ~newer
            todo = ~was_done
        if isinstance(source, SqlSource):
            parts, skipped = source.key_parts(keys, todo, spec.key, spec.chunk_rows)
        else:
            parts, skipped = source.with_skips(keys, todo, spec.key)
    if isinstance(sink, TableSink) and parts:
        first = source.sample(columns, 16)
        if len(first):
            sink.prepare(sample_output(model, first, identity))
    return Plan(spec, model, task, parts, source, skipped)


def run_part(task: PartTask, part: Part, model: LoadedModel, stop: threading.Event | None = None) -> PartResult:
    """Score one part and write it (retried from its start when a service goes away and the sink
    can take the same rows twice)."""
    if not task.retry:
        return _run_part_once(task, part, model, stop)
    log = RetryLog()
    try:
        result = retry_call(lambda: _run_part_once(task, part, model, stop), f"batch part {part.name}",
                            attempts=PART_ATTEMPTS, retry_if=lambda e: is_transient(e) and not isinstance(e, Stopped), log=log)
    finally:
        for entry in log.entries:
            print(f"warning: {entry}; retried", file=sys.stderr, flush=True)
    result.retries = len(log.entries)
    return result


def _run_part_once(task: PartTask, part: Part, model: LoadedModel, stop: threading.Event | None) -> PartResult:
    import pandas as pd

    result = PartResult(part.index, part.name)
    start, errors = time.perf_counter(), list[pd.DataFrame]()
    with task.sink.part(part, task.stamp) as sink_writer:
        writer = WriteBehind(sink_writer)  # the last chunk is written, the next read, while this one is scored
        chunks = ahead(_prepared(task, part, model, read_part(part, task.columns, task.chunk_rows)))
        try:
            _score_chunks(task, part, model, chunks, writer, result, errors, stop)
        finally:
            chunks.close()
            writer.close()
    result.seconds = time.perf_counter() - start
    result.errors = pd.concat(errors, ignore_index=True) if errors else None
    return result


@dataclass
class _Chunk:
    """A chunk ready to score."""

    rows: pd.DataFrame  # those not scored yet
    first_row: int  # the chunk's first row number within its part (rows skipped included)
    skipped: int  # rows already scored by this model version
    inputs: Inputs | None  # None when no row is left


def _prepared(task: PartTask, part: Part, model: LoadedModel, chunks: Iterator[pd.DataFrame]) -> Iterator[_Chunk]:
    """The part's chunks made ready to score, in the reader thread: rows already scored dropped,
    the rest validated and encoded. Mostly numpy work that releases the GIL, so it runs beside
    the last chunk's forward pass (in the scoring thread it was ~15% of that thread's CPU, 1M rows
    of 30 features)."""
    key = task.identity.key
    offset = 0
    for chunk in chunks:
        first_row, offset = offset, offset + len(chunk)
        skipped = 0
        if key is not None and part.skip is not None and len(part.skip):
            fresh = ~chunk[key].isin(part.skip).to_numpy()
            skipped = int((~fresh).sum())
            chunk = chunk[fresh]
        yield _Chunk(chunk, first_row, skipped, model_inputs(model, chunk) if len(chunk) else None)


def _score_chunks(task: PartTask, part: Part, model: LoadedModel, chunks: Iterator[_Chunk], writer: WriteBehind,
                  result: PartResult, errors: list[pd.DataFrame], stop: threading.Event | None) -> None:
    import pandas as pd

    for chunk in chunks:
        result.skipped += chunk.skipped
        result.rows += len(chunk.rows)  # rows to score (not those already scored)
        if chunk.inputs is not None:
            out, bad = score_chunk(model, chunk.rows, chunk.inputs, task.identity, part=part.name,
                                   first_row=chunk.first_row, stamp=pd.Timestamp.now(tz="UTC"))
            if bad is not None:
                errors.append(bad)
                result.invalid += len(bad)
            if out is not None:
                writer.write(out)
                result.scored += len(out)
        if stop is not None and stop.is_set():
            raise Stopped(f"stopped in part {part.name} after {result.rows} rows")


def run_local(p: Plan, stop: threading.Event | None = None, progress: bool = True) -> list[PartResult]:
    """The single-process engine: the parts in order, up to `--parts-at-once` of them in flight
    when the sink takes parts in any order (a folder, an S3 prefix, a table other than SQLite's).

    One part at a time, each part waits for its first chunk and for its last write (~37 ms per
    125k-row Parquet part here, 0.3 s of a 1M-row job in 8 parts); with two in flight the next
    part is read and scored meanwhile: that job ran 1.26x faster, and an S3 part's download or a
    table part's query overlaps the part before it."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    at_once = min(p.spec.parts_at_once if p.task.sink.parallel_parts else 1, len(p.parts)) or 1
    results: list[PartResult] = []
    p.task.sink.begin()
    ok = False
    bar = tqdm(total=len(p.parts), unit="part", disable=not progress or len(p.parts) < 2, file=sys.stderr)
    try:
        if at_once == 1:
            for part in p.parts:
                results.append(run_part(p.task, part, p.model, stop))
                bar.update(1)
        else:
            todo = iter(p.parts)
            with ThreadPoolExecutor(at_once, thread_name_prefix="batch-part") as pool:
                running: set[Future[PartResult]] = set()
                failed: BaseException | None = None
                while True:
                    while failed is None and len(running) < at_once and not (stop is not None and stop.is_set()):
                        upcoming = next(todo, None)
                        if upcoming is None:
                            break
                        running.add(pool.submit(run_part, p.task, upcoming, p.model, stop))
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            results.append(future.result())
                            bar.update(1)
                        except BaseException as e:  # the first error is raised once the parts in flight are done
                            failed = failed or e
                if failed is not None:
                    raise failed
            if len(results) < len(p.parts):  # stopped between parts
                raise Stopped(f"stopped after {len(results)} of {len(p.parts)} parts")
        ok = True
    finally:
        bar.close()
        p.task.sink.finish(ok)
    return sorted(results, key=lambda r: r.index)
