"""A real ``prefect server start`` on a free port of 127.0.0.1 that a test can restart.

Its PREFECT_HOME (SQLite database, concurrency leases) is kept across restarts, and leases
are stored in files there (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``, as deploy/README.md
asks of a production server): a restart keeps the slots of running flow runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT = 60.0  # measured: about 7 s on an idle 2-core machine
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


class PrefectServer:
    def __init__(self, home: Path) -> None:
        self.home = home
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
