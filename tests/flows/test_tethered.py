"""A tethered child ends when its parent ends, however the parent ends (a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from segflow.flows._tethered import tethered_command

# A parent that starts a tethered HTTP server (a module that runs until SIGTERM), from its
# main thread or from a thread that then ends, prints the parent PID and the flags the command
# gives the child, and the child's PID, and waits to be killed.
PARENT = """
import subprocess, sys, threading, time
from segflow.flows._tethered import tethered_command

def start():
    command = tethered_command("http.server", "--bind", "127.0.0.1", "0")
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = [arg for arg in command[4:5] if arg.startswith("--")]
    print(command[3], *flags, child.pid, flush=True)
    time.sleep(1.0)  # the child has set itself up before this thread ends

if sys.argv[1] == "thread":
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
else:
    start()
time.sleep(600)
"""


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("started_from", "flags", "within"),
    [
        ("main", ["--pdeathsig"], 2.0),  # the kernel's signal: at once
        # PR_SET_PDEATHSIG would fire when the starting thread ends: only the poll is used.
        ("thread", [], 5.0),
    ],
)
def test_a_tethered_child_ends_when_its_parent_is_killed(
    started_from: str, flags: list[str], within: float
) -> None:
    child = 0
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, started_from], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            parent_pid, *given, child_pid = parent.stdout.readline().split()
            child = int(child_pid)
            assert int(parent_pid) == parent.pid and given == flags
            time.sleep(1.5)  # the starting thread has ended; the child still runs
            assert not _gone_within(child, 0.1)
        finally:
            parent.kill()
    try:
        assert _gone_within(child, within)
    finally:
        if child and not _gone_within(child, 0):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_started_exits_at_once() -> None:
    command = tethered_command("http.server", "--bind", "127.0.0.1", "0")
    command[3] = str(os.getppid())  # not its parent: as if this process had died

    done = subprocess.run(command, capture_output=True, timeout=60)

    assert done.returncode == 128 + signal.SIGTERM
