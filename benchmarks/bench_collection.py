"""Bookkeeping cost of a collection of tiny items: the engine alone against the Prefect flow.

Writes ``--items`` synthetic 64^2 uint8 PNG tiles (blobs plus noise) to a temporary folder,
then segments them (gaussian -> Otsu -> label, one 64^2 block per item) into a fresh Zarr
store twice, on one local Dask cluster of ``--workers`` processes started before timing
(and warmed by a few items):

- **engine**: ``segflow.engine.collection`` alone, as the flow's tasks call it: discovery
  and the skip rule (``plan_collection``), the store's lock, then ``run_item`` per item
  (segment, append its record), ``ITEMS_IN_FLIGHT`` at a time from a thread pool as the
  flow does, then the index and catalogue compacted (each item's metadata is consolidated
  at its commit); once before the flow and once after (``engine_s`` is their mean: the
  machine varies). No Prefect imported on this side's path.
- **flow**: ``segment_collection`` with the same config pointing at the same cluster
  (``cluster.address``), under ``prefect_test_harness`` (a temporary Prefect server in a
  subprocess with its own database; its start-up is not timed). Items are batched into
  task runs as the config's ``run.batch`` says (``--batch``; default: automatic).

``overhead_fraction`` is ``(flow_s - engine_s) / flow_s``: the share of the flow's wall
time that is Prefect (task runs, state round trips to the server, logs and artifacts sent
to it). The engine side's own bookkeeping (records, index and catalogue compaction) is
printed as a share of its time too. The machine's load average is printed with the figures
(a shared machine slows both sides). Prints a line per figure, then, last, a JSON object.

Run: ``python benchmarks/bench_collection.py`` (``--items 100000`` for the issue's scale;
that takes hours on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

PIPELINE = [{"op": "gaussian", "sigma": 1.0}, {"op": "otsu"}, {"op": "label"}]
TILE = 64


def write_tiles(folder: Path, count: int) -> None:
    """``count`` 64^2 uint8 PNG tiles of smooth blobs plus noise, each different."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = ndi.zoom(rng.random((6, 6)), TILE / 6, order=1)[:TILE, :TILE]
        tile = (150 * coarse + 60 * rng.random((TILE, TILE))).astype(np.uint8)
        Image.fromarray(tile).save(folder / f"tile_{i:06d}.png")


def make_config(tiles: Path, store: Path, address: str, batch: int | None = None) -> dict[str, Any]:
    """The collection's config, as the flow takes it (absolute paths)."""
    return {
        "name": "bench-collection",
        "input": {"path": str(tiles)},
        "output": {"store": str(store), "chunks": [TILE, TILE]},
        "blocks": {"shape": [TILE, TILE]},
        "pipeline": PIPELINE,
        "cluster": {"address": address},
        "run": {"batch": batch},
    }


@contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        totals[key] += time.perf_counter() - started


@contextmanager
def timed_records(totals: dict[str, float]) -> Iterator[None]:
    """Add the time spent appending item records (on every thread) to ``totals``."""
    import segflow.store.index as index

    original = index.append_records
    lock = threading.Lock()

    def append_records(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            original(*args, **kwargs)
        finally:
            with lock:
                totals["append records (summed)"] += time.perf_counter() - started

    index.append_records = append_records
    try:
        yield
    finally:
        index.append_records = original


def run_engine(config: dict[str, Any], client: Any) -> tuple[float, dict[str, float], int]:
    """The flow's work through the engine alone; returns (seconds, breakdown, items done).

    The breakdown's ``items`` is the sum of ``run_item`` times over the threads (more than
    the wall time when items overlap; it includes the records, also given apart); the other
    keys are wall time on this thread.
    """
    from segflow.config import parse_config
    from segflow.engine.collection import ITEMS_IN_FLIGHT, plan_collection, run_item
    from segflow.engine.executor import DaskExecutor
    from segflow.store.commit import check_store, discard_trash, prepare_store
    from segflow.store.index import compact_index
    from segflow.store.lock import hold_store_lock
    from segflow.store.metadata import migrate_store

    totals: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    cfg = parse_config(config, base_dir=Path.cwd())
    store = cfg.output.store
    config_hash = cfg.config_hash()
    run_id = uuid.uuid4().hex
    with timed(totals, "discover + select"):
        plan = plan_collection(cfg)
    executor = DaskExecutor(client)

    def segment_one(item: dict[str, Any]) -> tuple[dict[str, Any], float]:
        begun = time.perf_counter()
        row, _ = run_item(cfg, item, executor=executor, run_id=run_id, config_hash=config_hash)
        return row, time.perf_counter() - begun

    done = 0
    check_store(store)
    with hold_store_lock(store, run_id=run_id), timed_records(totals):
        with timed(totals, "prepare store"):
            prepare_store(store)
            migrate_store(store)  # as the flow's writing_store: nothing on a new store
        with ThreadPoolExecutor(ITEMS_IN_FLIGHT) as pool:
            futures = [pool.submit(segment_one, item) for item in plan.work()]
            for future in as_completed(futures):
                row, seconds = future.result()
                totals["items (summed over threads)"] += seconds
                done += row["status"] == "done"
        with timed(totals, "compact index"):
            discard_trash(store, run_id)
            compact_index(store)  # the index and the catalogue's parts of these items
    return time.perf_counter() - started, dict(totals), done


def run_flow(config: dict[str, Any]) -> tuple[float, int, Any, list[Any]]:
    """``segment_collection`` on the config; returns (seconds, items done, the flow run and
    its task runs, read through the API afterwards)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from segflow.flows.segment import segment_collection

    started = time.perf_counter()
    state = segment_collection(config, return_state=True)
    seconds = time.perf_counter() - started
    summary = state.result(raise_on_failure=False)
    done = int(summary["done"]) if isinstance(summary, dict) else 0
    runs: list[Any] = []
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        while True:  # the API pages its answers (at most 200 per call)
            page = client.read_task_runs(flow_run_filter=flow_runs, offset=len(runs), limit=200)
            runs += page
            if len(page) < 200:
                break
    return seconds, done, flow_run, runs


def profile_task_runs(runs: list[Any]) -> dict[str, tuple[int, float]]:
    """Task runs per task (its function's name): count and summed run time in seconds
    (between the run's Running and final states). (A task run's ``created`` is no measure of its
    orchestration: Prefect 3 reports task runs to the server by events, so the server may
    create the record after the run ended.)"""
    profile: dict[str, tuple[int, float]] = {}
    for run in runs:
        name = run.task_key.rsplit("-", 1)[0]
        count, running = profile.get(name, (0, 0.0))
        profile[name] = (count + 1, running + run.total_run_time.total_seconds())
    return profile


def item_span(flow_run: Any, runs: list[Any]) -> tuple[float, float]:
    """Seconds from the flow run's start to the first item task's start, and from the last
    item task's end to the flow run's end."""
    items = [r for r in runs if r.task_key.startswith("segment_items_task") and r.start_time]
    first = min(r.start_time for r in items)
    last = max(r.end_time for r in items if r.end_time)
    return (
        (first - flow_run.start_time).total_seconds(),
        (flow_run.end_time - last).total_seconds(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=150, help="tiles in the collection")
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    parser.add_argument(
        "--batch", type=int, default=None, help="the flow's run.batch (default: automatic)"
    )
    args = parser.parse_args()

    from distributed import Client

    from segflow.engine.cluster import start_local_cluster

    with tempfile.TemporaryDirectory(prefix="segflow-bench-collection-") as name:
        folder = Path(name)
        began = time.perf_counter()
        write_tiles(folder / "tiles", args.items)
        write_tiles(folder / "warm", 6)
        print(f"wrote {args.items} tiles in {time.perf_counter() - began:.1f} s", flush=True)
        cluster = start_local_cluster(args.workers)
        try:
            with Client(cluster) as client:
                address = client.scheduler.address
                run_engine(make_config(folder / "warm", folder / "warm.zarr", address), client)
                engine_s, breakdown, engine_done = run_engine(
                    make_config(folder / "tiles", folder / "engine.zarr", address), client
                )
                load_engine = os.getloadavg()[0]
                from prefect.testing.utilities import prefect_test_harness

                os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
                with prefect_test_harness(server_startup_timeout=180):
                    flow_s, flow_done, flow_run, runs = run_flow(
                        make_config(folder / "tiles", folder / "flow.zarr", address, args.batch)
                    )
                # The engine again, after the flow: on a shared machine the same work
                # varies by 10-20 % from one minute to the next, so engine_s is the mean of
                # one run before and one after the flow (both printed).
                engine_after_s, _, after_done = run_engine(
                    make_config(folder / "tiles", folder / "engine-after.zarr", address), client
                )
        finally:
            cluster.close()
    load = os.getloadavg()[0]
    if args.items != engine_done or args.items != flow_done or args.items != after_done:
        raise SystemExit(f"items done: engine {engine_done}, flow {flow_done} of {args.items}")
    engine_before_s = engine_s
    engine_s = (engine_before_s + engine_after_s) / 2
    overhead = (flow_s - engine_s) / flow_s
    bookkeeping = sum(v for k, v in breakdown.items() if not k.startswith("items"))
    from segflow.engine.collection import batch_size

    batch = args.batch or batch_size([{"pixels": TILE * TILE}] * args.items)
    print(
        f"items                         {args.items}  ({args.workers} Dask workers, "
        f"flow batches of {batch})"
    )
    per_item = 1000 * engine_s / args.items
    print(
        f"engine alone (mean)           {engine_s:8.2f} s  {per_item:6.1f} ms/item  "
        f"(before the flow {engine_before_s:.2f} s, after {engine_after_s:.2f} s)"
    )
    for key, seconds in breakdown.items():
        print(f"  {key:<28}{seconds:8.2f} s")
    print(f"  share of all but the items  {bookkeeping / engine_before_s:8.3f}")
    print(
        f"flow                          {flow_s:8.2f} s  {1000 * flow_s / args.items:6.1f} ms/item"
    )
    task_runs = len(runs)
    print(f"  task runs                   {task_runs:8d}  ({task_runs / args.items:.2f} per item)")
    profile = profile_task_runs(runs)
    for task_name, (count, running) in sorted(profile.items()):
        print(f"    {task_name:<32}{count:6d} runs, {running:8.2f} s running in all")
    before, after = item_span(flow_run, runs)
    print(f"  flow start to first item    {before:8.2f} s")
    print(f"  last item to flow end       {after:8.2f} s")
    print(f"  Prefect per item            {1000 * (flow_s - engine_s) / args.items:8.1f} ms")
    print(f"overhead fraction             {overhead:8.3f}  (target <= 0.05)")
    print(
        f"load average (1 min) {load_engine:.1f} after the engine, {load:.1f} at the end, "
        f"on {os.cpu_count()} cores"
    )
    result = {
        "items": args.items,
        "workers": args.workers,
        "batch": batch,
        "flow_s": round(flow_s, 3),
        "engine_s": round(engine_s, 3),
        "engine_before_s": round(engine_before_s, 3),
        "engine_after_s": round(engine_after_s, 3),
        "overhead_fraction": round(overhead, 4),
        "engine_bookkeeping_fraction": round(bookkeeping / engine_before_s, 4),  # first run
        "engine_item_s": round(breakdown["items (summed over threads)"], 3),
        "task_runs": task_runs,
        "item_task_s": round(sum(v[1] for k, v in profile.items() if "segment" in k), 3),
        "engine_records_s": round(breakdown.get("append records (summed)", 0.0), 3),
        "load": round(load, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
