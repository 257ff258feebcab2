"""The Prefect API of a ``segflow run``: the user's, or a temporary one in its own session.

Prefect's own temporary server is a child in the command's process group, so the Ctrl-C
meant for the run killed it too, and the run then hung for minutes retrying a dead API.
Here the temporary server is started in a session of its own (it never sees the
terminal's signals) and stopped when the command ends; when the command is killed
(SIGKILL, the OOM killer), the server notices and stops itself
(:mod:`segflow.flows._tethered`). A watchdog polls the API's health while flows run: when
it stops answering, the run is asked to stop (it fails within seconds with one line,
keeping every committed item) instead of hanging in retries.

The command enters :func:`prefect_api` once, around all its configs, so it starts one
server however many configs it runs. Starting takes several seconds (7-13 s measured on a
loaded 2-core machine), so the command says what it is waiting for, every
:data:`WAIT_NOTE_EVERY` seconds while it waits, and gives up after Prefect's
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (the ``segflow`` command raises
Prefect's default of 20 s to :data:`segflow.flows._env.STARTUP_TIMEOUT`; Prefect's own
temporary server, started by ``segflow evaluate`` and ``train``, obeys it too).
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
from pathlib import Path

from segflow.flows._tethered import tethered_command

# Consecutive failed health checks, POLL seconds apart, before the API counts as gone.
POLL = 2.0
MISSES = 3
WAIT_NOTE_EVERY = 15.0  # seconds between "still waiting" lines while the server starts


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def prefect_api(say: Callable[[str], None] = say_on_stderr) -> Iterator[str | None]:
    """Yield the API URL flows will use: the configured one, or a temporary server's.

    ``say`` gets one line when a temporary server starts, a line every
    :data:`WAIT_NOTE_EVERY` seconds while it does not answer yet, and one when it answers.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield str(settings.api.url)
        return
    timeout = float(settings.server.ephemeral.startup_timeout_seconds)
    import httpx
    import prefect

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        **settings.to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    # Tethered: the server ends when this process ends, even killed by SIGKILL or the OOM
    # killer, which leave no chance to stop it from here (flows/_tethered.py).
    command = tethered_command(
        "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "error", "--lifespan", "on",
    )  # fmt: skip
    # The server's own messages (errors while it stops, say) go to a log file, not into the
    # command's output; a server that dies before answering has their tail in the error.
    log_path = Path(settings.home) / "segflow-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_until_healthy(httpx, server, url, timeout, say, log_path)
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


def _wait_until_healthy(
    httpx: object,
    server: subprocess.Popen[bytes],
    url: str,
    timeout: float,
    say: Callable[[str], None],
    log_path: Path | None = None,
) -> None:
    say(
        f"segflow: starting a temporary Prefect server (PREFECT_API_URL is not set); waiting "
        f"up to {timeout:.0f} s for {url}/health to answer"
    )
    start = time.monotonic()
    next_note = start + WAIT_NOTE_EVERY
    while not _healthy(httpx, url):
        now = time.monotonic()
        if server.poll() is not None:
            tail = ""
            if log_path is not None and log_path.is_file():
                lines = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                tail = "".join(f"\n  {line}" for line in lines)
            raise RuntimeError(
                f"the temporary Prefect server exited with status {server.poll()} before "
                f"answering; set PREFECT_API_URL to use a running server (its log: "
                f"{log_path}){tail}"
            )
        if now - start > timeout:
            raise RuntimeError(
                f"the temporary Prefect server did not answer at {url} within {timeout:.0f} s; "
                f"raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL "
                f"to use a running server"
            )
        if now >= next_note:
            say(f"segflow: still waiting for the temporary Prefect server ({now - start:.0f} s "
                f"of {timeout:.0f} s)")  # fmt: skip
            next_note += WAIT_NOTE_EVERY
        time.sleep(0.2)
    say(f"segflow: temporary Prefect server ready after {time.monotonic() - start:.1f} s")


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
