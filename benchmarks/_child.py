"""Run a benchmark's reference pipeline in a child process, so a hard time limit can stop it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_daskimage(
    module: str, source: Path, target: Path, workers: int, block: int, timeout: float
) -> tuple[float | None, int | None, str | None]:
    """Call ``module._daskimage_pipeline(source, target, workers, block)`` in a child process.

    The pipeline prints one JSON line with ``seconds`` and ``objects``. Returns those, or
    ``(None, None, reason)`` on a time-out or a failure (recorded by the caller, not hidden).
    """
    code = (
        f"import sys; sys.path.insert(0, sys.argv[1]); import {module} as b; "
        "b._daskimage_pipeline(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))"
    )
    here = str(Path(__file__).resolve().parent)
    command = [sys.executable, "-c", code, here, str(source), str(target), str(workers), str(block)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, None, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, None, f"exit {done.returncode}: {last}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), int(result["objects"]), None
