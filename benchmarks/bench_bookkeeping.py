"""Bookkeeping of a large collection, everything except pixels: time per item per phase.

For each collection size (``--sizes``, default 10^3, 10^4, 10^5) a child process builds a
store of that many items and times segflow's own functions on it, as a run calls them:

- **listing**: discovery on a synthetic listing (N paths of one folder): item ids
  (``assign_item_ids``) and item references (``item_references``, fingerprints given).
- **groups** (setup, not bookkeeping): each item's committed group written as a run's
  commit leaves it: the ``zarr.json`` of a real 64^2 item (commit record and consolidated
  metadata, some 8 kB) with the item's fingerprint. Stands in for the pixels.
- **records**: per item, its commit stamp (``stamp_commit``: its group's ``zarr.json``
  stat, read and stat again) and one ``append_records`` (an fsynced append), as each item
  records itself when it finishes; timed on the first :data:`RECORD_SAMPLE` items (their
  cost does not depend on the collection; fsyncs on a shared disk take 1-10 ms here, so
  10^5 of them would take most of the run); the rest are stamped and appended untimed.
- **compaction**: ``compact_index``: the records folded into the parts of
  ``index.parquet/`` and of the catalogue (each touched item's group read for its extent).
- **nothing_to_do**: the planning of the next run on the unchanged collection
  (``plan_items``: the index read, each done item's ``zarr.json`` stat'ed against its
  row's commit stamp, the skip rule), all skipped; ``nothing_to_do_read`` is the same
  planning with the stamps ignored, each commit record read (what it cost before stamps);
  then the check with the item groups as plain folders and as versions their
  ``STORE/ITEM`` links to, alternated, best of three each (``nothing_to_do_folders``,
  ``nothing_to_do_linked``, printed as a ratio: the cost of following the links).
- **add_one**: a run that adds one item to the N-item store: its group, its record, the
  compaction. Reported as seconds per run and bytes written outside the new item's group.
- **open_one**: ``xarray.open_zarr(STORE/ITEM)`` of one item; metadata bytes read.

With ``--georeferenced`` the items are 64^2 GeoTIFF tiles (UTM, laid out 1,000 to a row):
the compaction also writes each item's lon/lat footprint into the catalogue and its STAC
Item (:mod:`segflow.store.stac`), and a run adding one item rewrites its STAC Item, its
part's STAC catalogue and the Collection, counted in its writes outside the item.

Peak memory is the child's maximum resident set, per phase (Linux ``VmHWM``, reset between
phases through ``/proc/self/clear_refs``; a phase's peak includes what the process holds
from the phases before it, as Python keeps freed memory for reuse) and over the run. Prints
a table, each phase's time per item at each size over its time per item at the smallest
size of 10^4 or more (1.0 = flat), the peaks by phase, then, last, one JSON line.

Run: ``python benchmarks/bench_bookkeeping.py`` (``--sizes 1000 10000 100000 1000000``;
10^6 items write some 9 GB of item groups).
Vectors are not simulated (they need per-item tables): their part files are per item.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PHASES = ("listing", "records", "compaction", "nothing_to_do", "nothing_to_do_read")
CONFIG_HASH = "c0ffee"
RECORD_SAMPLE = 3_000  # items recorded one fsynced append each (the rest in appends of as many)


def phase_peak() -> int:
    """The process's peak resident set since the last call, in bytes (Linux ``VmHWM``,
    then reset through ``/proc/self/clear_refs``), so each phase gets its own peak; the
    lifetime peak (``ru_maxrss``) where /proc has neither."""
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def template_group(folder: Path, *, georeferenced: bool = False) -> dict[str, Any]:
    """The ``zarr.json`` of one real committed 64^2 item (segmented here, once): an array,
    or with ``georeferenced`` a GeoTIFF tile (UTM 33N, 10 m pixels)."""
    import numpy as np

    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import ArrayReader, open_item

    image = (np.random.default_rng(0).random((64, 64)) > 0.7).astype(np.float32)
    reader = ArrayReader(image, "tile") if not georeferenced else open_item(geotiff(folder, image))
    store = folder / "template.zarr"
    with LocalExecutor(1) as executor:
        result = segment_item(
            reader,
            [{"op": "threshold", "value": 0.5}, {"op": "label"}],
            store=str(store),
            block_shape=64,
            executor=executor,
            config_hash=CONFIG_HASH,
        )
    assert result.status == "done", result.error
    node: dict[str, Any] = json.loads((store / "tile" / "zarr.json").read_text())
    return node


def geotiff(folder: Path, image: Any) -> str:
    import rasterio

    path = folder / "tile.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=64, width=64, count=1, dtype="float32",
        crs="EPSG:32633", transform=rasterio.Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4e6),
    ) as dst:  # fmt: skip
        dst.write(image[None])
    return str(path)


def write_group(
    store: Path, item_id: str, template: dict[str, Any], fingerprint: str, k: int = 0
) -> None:
    """Item ``k``'s group; a georeferenced template's tiles laid out 1,000 to a row."""
    node = json.loads(json.dumps(template))
    node["attributes"]["item_id"] = item_id
    node["attributes"]["fingerprint"] = fingerprint
    node["attributes"]["segflow_commit"]["fingerprint"] = fingerprint
    if node["attributes"].get("transform"):
        node["attributes"]["transform"][2] += (k % 1000) * 640.0
        node["attributes"]["transform"][5] -= (k // 1000) * 640.0
    (store / item_id).mkdir()
    (store / item_id / "zarr.json").write_text(json.dumps(node))


def linked_ab(store: Path, readers: list[Any], item_ids: list[str]) -> dict[str, float]:
    """The nothing-to-do check with the item groups as plain folders and as versions that
    ``STORE/ITEM`` links to (as a commit leaves them), alternated three times (the moves
    between are not timed); the best of each."""
    from segflow.engine.collection import plan_items

    version = "20261207T000000.000000Z-0"
    times: dict[str, list[float]] = {"nothing_to_do_folders": [], "nothing_to_do_linked": []}
    for _ in range(3):
        for key in times:
            start = time.perf_counter()
            plan = plan_items(readers, [], str(store), config_hash=CONFIG_HASH, overwrite=False)  # type: ignore[arg-type]
            times[key].append(time.perf_counter() - start)
            assert not plan.todo and len(plan.skipped) == len(item_ids)
            for item_id in item_ids:  # folders -> links, then links -> folders
                target = store / ".segflow" / "versions" / item_id / version
                if key == "nothing_to_do_folders":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (store / item_id).rename(target)
                    (store / item_id).symlink_to(target.relative_to(store))
                else:
                    (store / item_id).unlink()
                    target.rename(store / item_id)
    return {key: min(values) for key, values in times.items()}


def row_of(item: dict[str, Any], version: str) -> dict[str, Any]:
    """The index row a run records for a done item, without its commit stamp."""
    return {
        "id": item["id"],
        "source": item["path"],
        "status": "done",
        "shape": "(64, 64)",
        "object_count": 12,
        "seconds": 0.3,
        "config_hash": CONFIG_HASH,
        "code_version": version,
        "fingerprint": item["fingerprint"],
    }


def listing(n: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Readers' stand-ins for a listing of ``n`` files, and their item references."""
    from segflow.engine.collection import item_references
    from segflow.io import assign_item_ids

    paths = [f"/data/tiles/tile_{i:07d}.png" for i in range(n)]
    ids = assign_item_ids(paths)
    readers = [
        SimpleNamespace(info=SimpleNamespace(id=i, path=p, fingerprint=f"{k:016x}", shape=(64, 64)))
        for k, (i, p) in enumerate(zip(ids, paths, strict=True))
    ]
    items, _ = item_references(readers, [])  # type: ignore[arg-type]
    return readers, items


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            out[path] = (stat.st_mtime_ns, stat.st_size)
    return out


def bookkeeping_files(store: Path) -> dict[str, tuple[int, int]]:
    """The store's own files (not item groups): index, catalogue, records, root metadata."""
    out = {}
    for name in ("index.parquet", "zarr.json"):  # an older store's index is one file
        if (store / name).is_file():
            stat = (store / name).stat()
            out[str(store / name)] = (stat.st_mtime_ns, stat.st_size)
    out.update(files_under(store / "index.parquet"))
    out.update(files_under(store / "catalogue.parquet"))
    out.update(files_under(store / "stac"))
    out.update(files_under(store / ".segflow"))
    return out


def child(n: int, folder: Path, *, georeferenced: bool = False) -> dict[str, Any]:
    """Every phase at ``n`` items; seconds per phase."""
    from segflow.engine.collection import plan_items
    from segflow.engine.item import code_version
    from segflow.store.commit import prepare_store
    from segflow.store.index import append_records, compact_index
    from segflow.store.stamps import stamp_commit

    peaks: dict[str, int] = {}
    template = template_group(folder, georeferenced=georeferenced)
    peaks["setup"] = phase_peak()
    version = code_version()
    template["attributes"]["segflow_commit"]["code_version"] = version
    store = folder / "out.zarr"
    prepare_store(str(store))
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    readers, items = listing(n)
    seconds["listing"] = time.perf_counter() - start
    peaks["listing"] = phase_peak()

    start = time.perf_counter()
    for k, item in enumerate(items):
        write_group(store, item["id"], template, item["fingerprint"], k)
    seconds["groups"] = time.perf_counter() - start
    peaks["groups"] = phase_peak()

    sample = items[:RECORD_SAMPLE]
    start = time.perf_counter()
    for item in sample:
        row = row_of(item, version)
        append_records(str(store), "run-1", [{**row, **stamp_commit(str(store), row)}])
    # Per item from the sample: each append is an fsync, whatever the collection's size.
    seconds["records"] = (time.perf_counter() - start) / len(sample) * n
    for first in range(len(sample), n, RECORD_SAMPLE):  # as a run's items add up, a batch at a time
        batch = [row_of(item, version) for item in items[first : first + RECORD_SAMPLE]]
        append_records(str(store), "run-1", [{**r, **stamp_commit(str(store), r)} for r in batch])
    peaks["records"] = phase_peak()

    start = time.perf_counter()
    compact_index(str(store))
    seconds["compaction"] = time.perf_counter() - start
    peaks["compaction"] = phase_peak()

    start = time.perf_counter()
    plan = plan_items(readers, [], str(store), config_hash=CONFIG_HASH, overwrite=False)  # type: ignore[arg-type]
    seconds["nothing_to_do"] = time.perf_counter() - start
    assert not plan.todo and len(plan.skipped) == n, (len(plan.todo), len(plan.skipped))
    del plan  # the next phases plan again: each phase's peak is its own
    peaks["nothing_to_do"] = phase_peak()
    seconds["nothing_to_do_read"] = nothing_to_do_reading(readers, store)
    peaks["nothing_to_do_read"] = phase_peak()
    seconds.update(linked_ab(store, readers, [item["id"] for item in items]))
    peaks["linked"] = phase_peak()

    add = add_one(store, template, version)
    peaks["add_one"] = phase_peak()
    opened = open_one(store, items[n // 2]["id"])
    peaks["open_one"] = phase_peak()
    peak = max(peaks.values())  # the resets above reset ``ru_maxrss`` too
    return {
        "n": n,
        "georeferenced": georeferenced,
        "seconds": seconds,
        **add,
        **opened,
        "peak_rss_bytes": peak,
        "phase_peak_rss_bytes": peaks,
    }


def nothing_to_do_reading(readers: list[Any], store: Path) -> float:
    """The nothing-to-do planning with every commit stamp ignored (each record read)."""
    import numpy as np

    from segflow.engine import collection

    trusting = collection.stamps_hold
    collection.stamps_hold = lambda store, rows: np.zeros(len(rows), dtype=bool)
    try:
        start = time.perf_counter()
        plan = collection.plan_items(
            readers,  # type: ignore[arg-type]
            [],
            str(store),
            config_hash=CONFIG_HASH,
            overwrite=False,
        )
        elapsed = time.perf_counter() - start
    finally:
        collection.stamps_hold = trusting
    assert not plan.todo
    return elapsed


def add_one(store: Path, template: dict[str, Any], version: str) -> dict[str, Any]:
    """A run that adds one item: its group, its record, the compaction; what it wrote."""
    from segflow.store.index import append_records, compact_index
    from segflow.store.stamps import stamp_commit

    before = bookkeeping_files(store)
    item = {"id": "new_item", "path": "/data/tiles/new_item.png", "fingerprint": "f" * 16}
    start = time.perf_counter()
    write_group(store, item["id"], template, item["fingerprint"], k=999_999)
    row = row_of(item, version)
    append_records(str(store), "run-2", [{**row, **stamp_commit(str(store), row)}])
    compact_index(str(store))
    elapsed = time.perf_counter() - start
    after = bookkeeping_files(store)
    written = {p: s for p, (m, s) in after.items() if before.get(p, (None, None))[0] != m}
    return {
        "add_one_s": elapsed,
        "add_one_bytes_outside_item": sum(written.values()),
        "add_one_files": sorted(os.path.relpath(p, store) for p in written),
    }


def open_one(store: Path, item_id: str) -> dict[str, Any]:
    import warnings

    import fsspec
    import xarray as xr
    from fsspec.implementations.local import LocalFileSystem

    read: list[int] = []

    class Counting(LocalFileSystem):
        protocol = ("benchcount",)

        def cat_file(self, path: str, start: Any = None, end: Any = None, **kw: Any) -> bytes:
            data = bytes(super().cat_file(path, start, end, **kw))
            read.append(len(data) if path.endswith("zarr.json") else 0)
            return data

        @classmethod
        def _strip_protocol(cls, path: Any) -> str:
            return str(LocalFileSystem._strip_protocol(str(path).removeprefix("benchcount://")))

    fsspec.register_implementation("benchcount", Counting, clobber=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the template's coordinates are never written
        xr.open_zarr(f"benchcount://{store}/{item_id}")
    return {"open_one_s": time.perf_counter() - start, "open_one_metadata_bytes": sum(read)}


def run_size(n: int, *, georeferenced: bool = False) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-bookkeeping-{n}-"))
    try:
        command = [sys.executable, __file__, "--child", str(n), "--folder", str(folder)]
        command += ["--georeferenced"] if georeferenced else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"size {n} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the flatness ratios; return the summary."""
    base = next((r for r in results if r["n"] >= 10_000), results[0])
    print(f"{'items':>9} " + " ".join(f"{p + ' us/item':>22}" for p in PHASES), end="")
    print(f" {'add-one s':>10} {'add-one kB':>11} {'open s':>7} {'open kB':>8} {'peak MB':>8}")
    ratios: dict[str, dict[str, float]] = {}
    for r in results:
        per = {p: r["seconds"][p] / r["n"] * 1e6 for p in PHASES}
        ratios[str(r["n"])] = {p: per[p] / (base["seconds"][p] / base["n"] * 1e6) for p in PHASES}
        cells = " ".join(f"{per[p]:>13.1f} ({ratios[str(r['n'])][p]:>4.2f}x)" for p in PHASES)
        print(
            f"{r['n']:>9} {cells} {r['add_one_s']:>10.3f} "
            f"{r['add_one_bytes_outside_item'] / 1e3:>11.1f} {r['open_one_s']:>7.3f} "
            f"{r['open_one_metadata_bytes'] / 1e3:>8.1f} {r['peak_rss_bytes'] / 2**20:>8.0f}"
        )
    for r in results:
        peaks = r.get("phase_peak_rss_bytes", {})
        line = ", ".join(f"{phase} {peak / 2**20:.0f}" for phase, peak in peaks.items())
        print(f"{r['n']}: peak MB by phase: {line}")
    for r in results:
        print(f"{r['n']}: add-one wrote {', '.join(r['add_one_files'])}")
        linked = r["seconds"]["nothing_to_do_linked"] / r["seconds"]["nothing_to_do_folders"]
        print(f"{r['n']}: nothing to do, items linked to versions / plain folders: {linked:.2f}")
    return {"base_items": base["n"], "ratios": ratios, "results": results}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Time per item of each phase against the collection size, log-log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    sizes = [r["n"] for r in results]
    figure, axes = plt.subplots(figsize=(6, 4))
    for phase in PHASES:
        per_item = [r["seconds"][phase] / r["n"] * 1e3 for r in results]
        axes.plot(sizes, per_item, marker="o", label=phase)
    axes.set(xscale="log", yscale="log", xlabel="items in the store", ylabel="ms per item")
    axes.set_title("segflow bookkeeping per item (flat = scales linearly)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--plot", type=Path, help="also write the figure to this PNG")
    parser.add_argument("--replot", type=Path, help="plot an earlier run's output (its log)")
    parser.add_argument(
        "--georeferenced",
        action="store_true",
        help="items are GeoTIFF tiles: the catalogue's footprints and the STAC view are written",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, georeferenced=args.georeferenced)))
        return
    if args.replot:
        plot(json.loads(args.replot.read_text().strip().splitlines()[-1]), args.plot)
        return
    results = []
    for n in args.sizes:
        results.append(run_size(n, georeferenced=args.georeferenced))
        print(f"{n} items: " + json.dumps(results[-1]["seconds"]), flush=True)
    summary = report(results)
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
