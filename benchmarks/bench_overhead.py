"""Prefect's share of one ~1,000-block job: ``segflow run`` against the engine alone.

Writes one ``--size``^2 float32 TIFF (blobs plus noise) and segments it (gaussian sigma 2 ->
Otsu -> label, ``--block``^2 blocks: 2048 / 64 = 32^2 = 1,024 blocks by default) into a fresh
Zarr store twice, on one local Dask cluster of ``--workers`` processes that the benchmark
starts before timing (and warms with one small item):

- **prefect**: ``segflow run CONFIG`` in a fresh process (``python -m segflow.flows``), the
  config's ``cluster.address`` set to that cluster, against a running ``prefect server
  start`` (started by the benchmark before timing, as a deployment has one:
  ``PREFECT_API_URL``): process start, imports, the flow and task runs, the item, the index.
- **prefect, temporary server**: the same command without ``PREFECT_API_URL``, so it also
  starts and stops segflow's temporary Prefect server (what the quick start pays).
- **engine**: a fresh process that runs the same item through the engine alone
  (``bench_collection.run_engine``: discovery, the store's lock, ``segment_item``, the
  record, the index), on the same cluster; Prefect is never imported.

Both are timed from outside, start to exit, so both pay a Python start and their imports.
``overhead_fraction`` is ``(prefect_s - engine_s) / prefect_s`` (running server);
``overhead_fraction_temporary_server`` the same with the temporary server. The item's own time (the
``seconds`` of its index row) is printed for both, to separate what Prefect adds around the
item from what it adds inside it. The machine's load average is printed with the figures.
Prints a line per figure, then, last, a JSON object.

Run: ``python benchmarks/bench_overhead.py`` (``--size 4096 --block 128`` for the same
block count on a larger item).
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
from typing import Any

import numpy as np
import tifffile
import yaml
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PIPELINE = [{"op": "gaussian", "sigma": 2.0}, {"op": "otsu"}, {"op": "label"}]


def write_item(path: Path, size: int, *, blob: int = 64) -> None:
    """A ``size``^2 float32 TIFF of blobs about ``blob`` pixels across plus noise."""
    rng = np.random.default_rng(0)
    coarse = ndi.zoom(rng.random((size // blob + 2, size // blob + 2)), blob, order=1)
    image = coarse[:size, :size] + 0.8 * rng.random((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image.astype(np.float32))


def make_config(source: Path, store: Path, block: int, address: str) -> dict[str, Any]:
    return {
        "name": "bench-overhead",
        "input": {"path": str(source)},
        "output": {"store": str(store), "chunks": [block, block]},
        "blocks": {"shape": [block, block]},
        "pipeline": PIPELINE,
        "cluster": {"address": address},
    }


def engine_child(config_json: str) -> None:
    """In the child process: the engine alone on the config; prints its in-process time."""
    from bench_collection import run_engine
    from distributed import Client

    config = json.loads(config_json)
    with Client(config["cluster"]["address"]) as client:
        seconds, _, done = run_engine(config, client)
    print(json.dumps({"seconds": seconds, "done": done}))


def server_child() -> None:
    """In the child process: what ``segflow run`` pays before any flow: importing the flow
    (Prefect with it), then starting and stopping segflow's temporary Prefect server."""
    started = time.perf_counter()
    from segflow.flows import (
        cli,  # noqa: F401  (sets PREFECT_HOME's defaults first)
        segment,  # noqa: F401
    )
    from segflow.flows._server import prefect_api

    imported = time.perf_counter()
    with prefect_api(say=lambda line: None):
        up = time.perf_counter()
    stopped = time.perf_counter()
    print(
        json.dumps(
            {"import_s": imported - started, "start_s": up - imported, "stop_s": stopped - up}
        )
    )


def time_process(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds one process takes, start to exit, and its stdout; exits on a failure."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def item_seconds(store: Path) -> float:
    """The ``seconds`` the store's index recorded for its one item."""
    from segflow.store.index import read_index

    index = read_index(store)
    if len(index) != 1 or index.loc[0, "status"] != "done":
        raise SystemExit(f"{store}: expected one done item, index says {index.to_dict('records')}")
    return float(index.loc[0, "seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square item")
    parser.add_argument("--block", type=int, default=64, help="side of the square blocks")
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    parser.add_argument("--engine-child", help=argparse.SUPPRESS)
    parser.add_argument("--server-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_child:
        engine_child(args.engine_child)
        return
    if args.server_child:
        server_child()
        return

    from _prefect_server import free_port, prefect_server
    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    blocks = ((args.size + args.block - 1) // args.block) ** 2
    with tempfile.TemporaryDirectory(prefix="segflow-bench-overhead-") as name:
        folder = Path(name)
        write_item(folder / "item" / "large.tif", args.size)
        write_item(folder / "warm" / "small.tif", 4 * args.block)
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH")
        }
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), str(HERE)]),
            PREFECT_HOME=str(folder / "prefect"),  # the temporary server's database
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        cluster = start_local_cluster(args.workers)
        try:
            with Client(cluster) as client:
                address = client.scheduler.address

                def engine_command(source: Path, store: Path) -> list[str]:
                    config = make_config(source, store, args.block, address)
                    return [sys.executable, __file__, "--engine-child", json.dumps(config)]

                time_process(engine_command(folder / "warm", folder / "warm.zarr"), env)
                engine_s, out = time_process(
                    engine_command(folder / "item", folder / "engine.zarr"), env
                )
                engine_inside = json.loads(out.strip().splitlines()[-1])["seconds"]
                config_path = folder / "config.yaml"
                config_path.write_text(
                    yaml.safe_dump(
                        make_config(folder / "item", folder / "prefect.zarr", args.block, address)
                    )
                )
                command = [sys.executable, "-m", "segflow.flows", "run", str(config_path)]
                temporary_s, _ = time_process(command, env)
                temporary_item = item_seconds(folder / "prefect.zarr")
                config_path.write_text(
                    yaml.safe_dump(
                        make_config(folder / "item", folder / "served.zarr", args.block, address)
                    )
                )
                with prefect_server(env, free_port()) as url:
                    prefect_s, _ = time_process(command, {**env, "PREFECT_API_URL": f"{url}/api"})
            server_process_s, out = time_process([sys.executable, __file__, "--server-child"], env)
            server = json.loads(out.strip().splitlines()[-1])
            engine_item = item_seconds(folder / "engine.zarr")
            prefect_item = item_seconds(folder / "served.zarr")
        finally:
            cluster.close()
    load = os.getloadavg()[0]
    overhead = (prefect_s - engine_s) / prefect_s
    overhead_temporary = (temporary_s - engine_s) / temporary_s
    print(f"item {args.size}^2 in {args.block}^2 blocks: {blocks} blocks, {args.workers} workers")
    print(f"segflow run, running server    {prefect_s:7.2f} s   item {prefect_item:6.2f} s")
    print(f"segflow run, temporary server  {temporary_s:7.2f} s   item {temporary_item:6.2f} s")
    print(
        f"engine alone (process)         {engine_s:7.2f} s   item {engine_item:6.2f} s, "
        f"run_engine {engine_inside:.2f} s"
    )
    rest = temporary_s - server_process_s - temporary_item
    print(
        f"  of segflow run (temporary server), measured apart: Python start + imports "
        f"{server_process_s - server['start_s'] - server['stop_s']:.2f} s (of which importing "
        f"the flow {server['import_s']:.2f} s), temporary server start {server['start_s']:.2f} s, "
        f"stop {server['stop_s']:.2f} s; the rest (flow and task runs, discovery, the index, "
        f"Dask client) {rest:.2f} s"
    )
    print(f"overhead fraction              {overhead:7.3f}  (target <= 0.05; running server)")
    print(f"  with the temporary server    {overhead_temporary:7.3f}")
    print(f"load average (1 min) {load:.1f} on {os.cpu_count()} cores")
    print(
        json.dumps(
            {
                "blocks": blocks,
                "workers": args.workers,
                "prefect_s": round(prefect_s, 3),
                "engine_s": round(engine_s, 3),
                "overhead_fraction": round(overhead, 4),
                "prefect_temporary_server_s": round(temporary_s, 3),
                "overhead_fraction_temporary_server": round(overhead_temporary, 4),
                "prefect_item_s": round(prefect_item, 3),
                "engine_item_s": round(engine_item, 3),
                "server_start_s": round(server["start_s"], 3),
                "import_s": round(server["import_s"], 3),
                "load": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
