"""A real ``prefect server start`` on a free port of 127.0.0.1 that a test can restart, and
flow runs in processes of their own against it (``_store_runs.py``).

Its PREFECT_HOME (SQLite database, concurrency leases) is kept across restarts, and leases
are stored in files there (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``, as deploy/README.md
asks of a production server): a restart keeps the slots of running flow runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).parents[2]
RUNS = Path(__file__).with_name("_store_runs.py")
PROCESS_TIMEOUT = 180.0  # a flow process here: 5-15 s of imports, then a second of work
STARTUP_TIMEOUT = 120.0  # measured: about 7 s on an idle 2-core machine, over 60 s at load 16
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


class PrefectServer:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env or {}  # more of the server's settings (its database, say)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    def start(self) -> str | None:
        """Start the server; None once it answers, else why it did not (its log's tail)."""
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",  # the API is what is checked; the UI costs start-up
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            **self.env,
        }
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return (
                    f"`prefect server start` did not answer {self.url}/health within "
                    f"{STARTUP_TIMEOUT:.0f} s (exit status {self.process.poll()}): "
                    f"{self.log.read_text()[-500:]}"
                )
            time.sleep(0.25)
        return None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


class Run:
    """A flow run in a process of its own (``_store_runs.py ROLE ARGS``); its output in a file."""

    def __init__(self, server: PrefectServer, tmp_path: Path, name: str, *args: str) -> None:
        env = {
            **os.environ,
            "PREFECT_API_URL": server.url,
            "PREFECT_HOME": str(tmp_path / "client-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
        self.output = tmp_path / f"{name}.log"
        with self.output.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(RUNS), *args], env=env, stdout=log, stderr=log
            )

    def text(self) -> str:
        return self.output.read_text()

    def finish(self) -> dict[str, Any]:
        """The final state's type and message (the process's last line)."""
        self.process.wait(timeout=PROCESS_TIMEOUT)
        last = self.text().strip().splitlines()[-1]
        try:
            result: dict[str, Any] = json.loads(last)
        except ValueError:
            pytest.fail(f"no final state printed:\n{self.text()[-3000:]}")
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PROCESS_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)
    return value
