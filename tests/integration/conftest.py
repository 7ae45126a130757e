"""Real services for integration tests. In CI (CI=true) a missing service fails the test, never skips it."""

from __future__ import annotations

import os
import uuid

import pytest

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna"  # the stack's database


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must start it: scripts/stack.sh up mlflow)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a reachable PostgreSQL test database (WORKBENCH_TEST_POSTGRES_URL)."""
    import sqlalchemy

    url = os.environ.get("WORKBENCH_TEST_POSTGRES_URL", DEFAULT_URL)
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # any driver error means: not there
        _unavailable(f"PostgreSQL is not reachable at {url}: {str(e).splitlines()[0]}")
    return url


@pytest.fixture
def study_name() -> str:
    """A study name no other test (or earlier run) uses."""
    return f"it_{uuid.uuid4().hex[:10]}"


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.startswith("tests/integration/"):  # as make test's scheduler tells them (tests/conftest.py)
            item.add_marker(pytest.mark.integration)
    # Tests that restart or stop shared services run after the others (make test runs them alone,
    # after the parallel part); the whole-stack test, which stops the services, runs last.
    items.sort(key=lambda item: (item.get_closest_marker("exclusive") is not None, item.fspath.basename == "test_stack.py"))


@pytest.fixture(scope="session")
def mlflow_uri() -> str:
    """URL of the MLflow tracking server (PostgreSQL backend, S3 artifacts) started by scripts/stack.sh."""
    import urllib.request

    uri = os.environ.get("WORKBENCH_TEST_MLFLOW_URI", "http://127.0.0.1:5000")
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=5).read()
    except Exception as e:
        _unavailable(f"MLflow tracking server is not reachable at {uri}: {e}")
    return uri


@pytest.fixture(scope="session")
def s3_bucket():
    """(boto3 client, bucket) of the S3 endpoint behind the tracking server's artifacts."""
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    bucket = os.environ.get("MLFLOW_BUCKET", "mlflow")
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:
        _unavailable(f"S3 bucket {bucket!r} is not reachable at {endpoint}: {e}")
    return client, bucket
