"""Client memory of a global statistic with many blocks: merged as a tree on the workers, or
every block's partial sent to the client.

A uniformly random uint16 item in small blocks makes the largest percentile partials (sparse
counts of up to 65,536 key digits per block). Each mode runs in its own process (peak
resident memory only grows), on a fresh 2-worker ``distributed.LocalCluster``; the number is
how much the client process's peak grew during the timed run. Prints a line per mode, then,
last, a JSON object.

Run: ``python benchmarks/bench_tree_reduction.py`` (``--size 8192`` for more blocks).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(size: int, block: int, fan_in: int) -> dict[str, float]:
    import numpy as np
    from distributed import Client

    from segflow import segment
    from segflow.engine import run
    from segflow.engine.cluster import start_local_cluster

    run.FAN_IN = fan_in
    image = np.random.default_rng(0).integers(0, 65535, (size, size), dtype=np.uint16)
    step = [{"op": "threshold_percentile", "q": 90}]
    with start_local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        segment(image[:512, :512], step, block_shape=256, client=client)  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        out = segment(image, step, block_shape=block, client=client)
        seconds = time.perf_counter() - started
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": seconds, "client_mb": grown / 1024, "foreground": float(out.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--fan-in", type=int, default=0, help=argparse.SUPPRESS)  # one mode
    args = parser.parse_args()
    if args.fan_in:
        print(json.dumps(measure(args.size, args.block, args.fan_in)))
        return
    blocks = (args.size // args.block) ** 2
    results = {}
    for mode, fan_in in (("tree", 16), ("all_to_client", 10**9)):
        command = [sys.executable, __file__, f"--size={args.size}", f"--block={args.block}",
                   f"--fan-in={fan_in}"]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        seconds, grown = results[mode]["seconds"], results[mode]["client_mb"]
        print(f"{mode:<14} {blocks} blocks: {seconds:.2f} s, client peak +{grown:.0f} MB")
    print(json.dumps({m: {k: round(v, 3) for k, v in r.items()} for m, r in results.items()}))


if __name__ == "__main__":
    main()
