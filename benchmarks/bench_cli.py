"""Wall time of the ``segflow`` command's fast paths, each a fresh process as a user runs it.

Measures ``--version``, ``ops``, ``ops gaussian``, ``validate configs/nuclei.yaml`` and
``run configs/nuclei.yaml`` with nothing to do (every item done and committed in the store:
decided before Prefect or Dask is imported), against the same ``run`` with the item to do
(temporary Prefect server, local Dask cluster, the item, the index). The store is a temporary
folder; the command runs from this checkout (``python -m flows``). Best of ``--repeat`` runs
per command (the first run with work is measured once); the machine's load average is
printed with the figures, since a shared machine slows every process start. Prints a line
per command, then, last, a JSON object.

Run: ``python benchmarks/bench_cli.py`` (``--repeat 5``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUCLEI = str(ROOT / "configs" / "nuclei.yaml")


def time_command(args: list[str], env: dict[str, str], *, expect: int = 0) -> float:
    """Seconds one ``python -m flows ARGS`` process takes, start to exit."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != expect:
        raise SystemExit(f"segflow {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="segflow-bench-cli-") as folder:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "XDG_CACHE_HOME": folder,  # the temporary Prefect server's state
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        store = ["--set", f"output.store={Path(folder) / 'nuclei.zarr'}"]
        results = {"run, 1 item to do": time_command(["run", NUCLEI, *store], env)}
        commands = {
            "--version": ["--version"],
            "ops": ["ops"],
            "ops gaussian": ["ops", "gaussian"],
            "validate": ["validate", NUCLEI],
            "run, nothing to do": ["run", NUCLEI, *store],
        }
        for name, command in commands.items():
            results[name] = min(time_command(command, env) for _ in range(args.repeat))
    load = os.getloadavg()[0]
    for name, seconds in results.items():
        print(f"segflow {name:<20} {seconds:6.2f} s")
    print(f"load average (1 min) {load:.1f} on {os.cpu_count()} cores")
    print(json.dumps({**{k: round(v, 3) for k, v in results.items()}, "load": round(load, 2)}))


if __name__ == "__main__":
    main()
