"""The Prefect API of a ``segflow run``: the user's, or a temporary one in its own session.

Prefect's own temporary server is a child in the command's process group, so the Ctrl-C
meant for the run killed it too, and the run then hung for minutes retrying a dead API.
Here the temporary server is started in a session of its own (it never sees the
terminal's signals) and stopped when the command ends. A watchdog polls the API's health
while flows run: when it stops answering, the run is asked to stop (it fails within
seconds with one line, keeping every committed item) instead of hanging in retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

# Consecutive failed health checks, POLL seconds apart, before the API counts as gone.
POLL = 2.0
MISSES = 3
STARTUP_TIMEOUT = 120.0


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL flows will use: the configured one, or a temporary server's."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    import httpx
    import prefect

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
    command += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    server = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(httpx, url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the temporary Prefect server did not start (exit status "
                    f"{server.poll()}); set PREFECT_API_URL to use a running server"
                )
            time.sleep(0.2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def watch_api(url: str | None, on_lost: Callable[[str], None]) -> Iterator[None]:
    """Call ``on_lost(reason)`` once if ``url`` stops answering for ``MISSES`` polls."""
    if not url:
        yield
        return
    import httpx

    stop = threading.Event()

    def watch() -> None:
        misses = 0
        while not stop.wait(POLL):
            misses = 0 if _healthy(httpx, url) else misses + 1
            if misses >= MISSES:
                on_lost(f"the Prefect API at {url} stopped answering")
                return

    thread = threading.Thread(target=watch, name="segflow-api-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _drain_prefect() -> None:
    """Send Prefect's queued logs and events while the server still answers (otherwise
    they are retried against a stopped server when the process exits)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=5)
        except Exception:
            continue


def _healthy(httpx: object, url: str) -> bool:
    try:
        response = httpx.get(f"{url}/health", timeout=2.0)  # type: ignore[attr-defined]
    except Exception:
        return False
    return bool(response.status_code == 200)
