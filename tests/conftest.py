"""Shared fixtures. Prefect's home is a temporary folder, set before anything imports prefect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server (a real S3 HTTP endpoint on 127.0.0.1) for the whole session, and
    the environment that points clients at it. One per session: fsspec keeps one s3fs
    instance per process, bound to the endpoint it first saw."""
    pytest.importorskip("moto", reason="moto[server] is a dev dependency (the local S3 server)")
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency (s3:// through fsspec)")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the moto S3 server did not answer within 60 s")
            time.sleep(0.3)
    env = {
        "AWS_ACCESS_KEY_ID": "segflow-test",
        "AWS_SECRET_ACCESS_KEY": "segflow-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
