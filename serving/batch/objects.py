"""Files in a local folder or under an S3 prefix: list, fetch, and put atomically.

S3 is reached with the same variables as MLflow's artifacts (MLFLOW_S3_ENDPOINT_URL for MinIO or
moto, AWS_* for credentials and region). A put is atomic on both: a local file is written beside
its target and renamed; an S3 object exists only once its upload is complete. Names that start
with `.` or `_` (temporary files, error reports) are never listed as data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models.errors import ExitCode
from models.faults import describe
from serving.store import ServingError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class BatchError(ServingError):
    """A batch job cannot run as asked (a missing table or column, no input files, ...): one line."""

    exit_code = ExitCode.USAGE


def fmt_of(name: str) -> str | None:
    """`csv` or `parquet` from a file name, or None."""
    return FORMATS.get(Path(name).suffix.lower())


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise BatchError(f"{uri!r}: an S3 URI must name a bucket (s3://bucket/prefix/)")
    return bucket, key


def s3_client():
    """A boto3 S3 client for MLflow's artifact endpoint (MLFLOW_S3_ENDPOINT_URL), else AWS."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)


@dataclass(frozen=True)
class Folder:
    """A local folder or an S3 prefix holding data files (`uri` ends without a slash)."""

    uri: str

    @classmethod
    def parse(cls, uri: str) -> Folder:
        return cls(uri.rstrip("/") if is_s3(uri) else str(Path(uri)))

    def child(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def names(self) -> list[str]:
        """Data files directly in the folder, sorted by name."""
        if is_s3(self.uri):
            bucket, prefix = split_s3(self.uri + "/")
            found: list[str] = []
            try:
                for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                    found += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            except Exception as e:
                raise BatchError(f"{self.uri}/: cannot list: {describe(e)}") from None
        else:
            path = Path(self.uri)
            found = [p.name for p in path.iterdir() if p.is_file()] if path.is_dir() else []
        return sorted(n for n in found if fmt_of(n) and not n.startswith((".", "_")))


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path to read `uri` from (an S3 object is downloaded to a temporary file)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    bucket, key = split_s3(uri)
    with tempfile.TemporaryDirectory(prefix="workbench-batch-") as tmp:
        target = Path(tmp) / Path(key).name
        try:
            s3_client().download_file(bucket, key, str(target))
        except Exception as e:
            raise BatchError(f"{uri}: cannot download: {describe(e)}") from None
        yield target


@contextlib.contextmanager
def staged(uri: str) -> Iterator[Path]:
    """A local file to write; when the block ends without an error it becomes `uri` at once
    (rename or one S3 upload); on an error nothing appears at `uri`."""
    # Beside the target (a rename within one file system); its name starts with a dot, so a job
    # killed here leaves a folder that no listing takes for data.
    with tempfile.TemporaryDirectory(prefix=".workbench-batch-", dir=None if is_s3(uri) else _parent(uri)) as tmp:
        path = Path(tmp) / ("." + Path(uri).name)
        yield path
        if not path.exists():
            return
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().upload_file(str(path), bucket, key)
        else:
            os.replace(path, uri)


def _parent(uri: str) -> str:
    parent = Path(uri).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)
