"""Run a Python module that ends when the process that started it ends, however that ends.

``python -m segflow.flows._tethered PARENT_PID [--pdeathsig] MODULE ARG...`` runs ``python -m
MODULE ARG...`` in this process after tying it to process ``PARENT_PID``. The command's
temporary Prefect server runs so: it lives in a session of its own (the terminal's Ctrl-C
must not reach it) and the command stops it when it ends normally, but a command killed by
``kill -9`` or the kernel's OOM killer cannot stop anything, and the server (a uvicorn
process of about 200 MB) was still running, adopted by PID 1, half an hour later.

Here the child notices its parent's death itself, twice over:

- on Linux, with ``--pdeathsig``, the kernel sends it SIGTERM when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, set before the module starts; uvicorn stops on SIGTERM).
  The kernel sends it when the *thread* that started the child ends, so the parent asks for
  it only when it starts the child from its main thread;
- everywhere, a thread polls the parent's PID every :data:`POLL` seconds: once the parent is
  gone (the child was adopted by another process), it sends SIGTERM to this process, and
  exits it :data:`GRACE` seconds later if the module has not stopped by then.

A parent that died before any of this was set up is caught by comparing ``os.getppid()``
with ``PARENT_PID`` after ``prctl``: the child then exits at once.

This module imports only the standard library before it runs ``MODULE``.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence

POLL = 0.5  # seconds between checks of the parent's PID
GRACE = 10.0  # seconds the module has to stop on SIGTERM once the parent is gone
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def tethered_command(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m module args...`` tied to this process.

    ``--pdeathsig`` is asked for only from the main thread (see the module's docstring).
    """
    command = [sys.executable, "-m", "segflow.flows._tethered", str(os.getpid())]
    if threading.current_thread() is threading.main_thread():
        command.append("--pdeathsig")
    return [*command, module, *args]


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def watch_parent(parent: int, *, poll: float = POLL, grace: float = GRACE) -> threading.Thread:
    """Start a daemon thread that stops this process once ``parent`` is no longer its parent:
    SIGTERM first, then an immediate exit ``grace`` seconds later."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="segflow-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str]) -> None:
    parent, *rest = argv
    pdeathsig = rest[:1] == ["--pdeathsig"]
    module, *args = rest[1:] if pdeathsig else rest
    if pdeathsig:
        set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the signal was set
        sys.exit(128 + signal.SIGTERM)
    watch_parent(int(parent))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
