"""Shared fixtures. Prefect's home is a temporary folder, set before anything imports prefect."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Prefect reads PREFECT_HOME (and creates it) when first imported: set it before any test
# module imports prefect, so the suite never touches ~/.prefect or the user's server.
_PREFECT_HOME = tempfile.mkdtemp(prefix="segflow-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILES_PATH", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite in PREFECT_HOME) for the whole session."""
    # Importing prefect's main module sets up its console logging on the current sys.stderr:
    # do it here (pytest's stream for the session), not inside a CliRunner invocation whose
    # stream is closed afterwards.
    import prefect.main  # noqa: F401
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
