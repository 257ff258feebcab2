"""How the engine waits for an item's blocks, against a loop of ``distributed.wait``.

An item's blocks are waited on with progress and a stop check every few milliseconds. A loop
of ``distributed.wait(pending, timeout, return_when="FIRST_COMPLETED")`` waits anew on every
pending future at each turn: time and this process's memory grow with the square of the
block count. ``DaskExecutor.wait`` uses ``distributed.as_completed``. Both sides wait on the
same trivial tasks (1 ms each) on 2 local workers started before timing; each side runs in
a fresh process so that its memory is its own.

Run: ``python benchmarks/bench_wait.py [--tasks 1000 4000]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _task(x: int) -> int:
    time.sleep(0.001)
    return x


def measure(side: str, n: int) -> dict[str, float]:
    """Seconds to wait for ``n`` tasks and this process's memory growth, one ``side``."""
    import psutil
    from distributed import Client, LocalCluster, wait

    from segflow.engine.executor import DaskExecutor

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        process = psutil.Process()
        before = process.memory_info().rss
        started = time.perf_counter()
        futures = client.map(_task, range(n), pure=False)
        if side == "segflow":
            DaskExecutor(client).wait(futures, label="bench", progress=None)
        else:
            pending = set(futures)
            while pending:
                try:
                    _, pending = wait(pending, timeout=0.25, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
        seconds = time.perf_counter() - started
        grown = (process.memory_info().rss - before) / 2**20
    return {"seconds": round(seconds, 2), "memory_mib": round(grown, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--side", choices=["segflow", "wait-loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        print(json.dumps(measure(args.side, args.tasks[0])))
        return
    results = []
    for n in args.tasks:
        row: dict[str, object] = {"tasks": n}
        for side in ("segflow", "wait-loop"):
            command = [sys.executable, __file__, "--side", side, "--tasks", str(n)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row[side] = json.loads(out.strip().splitlines()[-1])
        ratio = row["wait-loop"]["seconds"] / max(row["segflow"]["seconds"], 1e-9)  # type: ignore[index]
        row["ratio"] = round(ratio, 1)
        print(
            f"{n:>6} tasks: segflow {row['segflow']}, wait loop {row['wait-loop']}, "
            f"{row['ratio']}x faster"
        )
        results.append(row)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
