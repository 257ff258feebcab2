"""A real ``prefect server start`` for a benchmark or a screenshot script (not used by CI)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def prefect_server(env: Mapping[str, str], port: int, *, timeout: float = 180) -> Iterator[str]:
    """Run ``prefect server start`` on ``port`` of 127.0.0.1 with ``env``; yield its URL
    (``http://127.0.0.1:PORT``) once its health check answers, stop it afterwards. Exits
    when it does not answer within ``timeout`` seconds."""
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=3).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    reason = f"{url}: prefect server did not answer within {timeout:.0f} s"
                    raise SystemExit(reason) from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
