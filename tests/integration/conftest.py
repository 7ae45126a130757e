"""Real services for integration tests. In CI (CI=true) a missing service fails the test, never skips it."""

from __future__ import annotations

import os
import uuid

import pytest

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/workbench_test"


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must start it: scripts/services.sh up)", pytrace=False)
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


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
