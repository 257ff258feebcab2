"""Icechunk against plain local Zarr: writing and reading the same label arrays.

The measurement behind the README's "why versioned plain Zarr, not Icechunk". Each round
writes one item's labels (uint32, zstd, the engine's default 2048^2 chunks unless
``--chunk``) as a new version, then reads the latest and the first version back whole:

* plain: a Zarr v3 group per version in its own folder (what segflow's item versions are;
  the link swap is a rename, not timed);
* icechunk: one local-filesystem repository, a commit per version, reads through a
  read-only session on the branch or the first snapshot.

Icechunk is not a segflow dependency: install it beside the venv to run this, e.g.
``pip install --no-deps --target /tmp/icechunk-pkg icechunk`` and
``PYTHONPATH=/tmp/icechunk-pkg python benchmarks/bench_icechunk.py``. The last line is one
JSON object (best of ``--repeat`` per side, ratios icechunk / plain).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage as ndi


def make_labels(size: int, seed: int) -> np.ndarray:
    """Blob labels like a segmentation's (uint32, a few thousand objects)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random((size, size), dtype=np.float32), 8)
    labels, _ = ndi.label(field > np.quantile(field, 0.6))
    return labels.astype(np.uint32)


def _write(store: Any, labels: np.ndarray, chunk: int) -> None:
    group = zarr.open_group(store, mode="a", zarr_format=3)
    array = group.create_array(
        "labels", shape=labels.shape, chunks=(chunk, chunk), dtype=labels.dtype, overwrite=True
    )
    array[...] = labels


def _read(store: Any) -> np.ndarray:
    return np.asarray(zarr.open_array(store, path="labels", mode="r")[...])


def run_plain(root: Path, versions: list[np.ndarray], chunk: int) -> dict[str, float]:
    started = time.perf_counter()
    for k, labels in enumerate(versions):
        _write(str(root / f"v{k}"), labels, chunk)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    latest = _read(str(root / f"v{len(versions) - 1}"))
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    first = _read(str(root / "v0"))
    old_s = time.perf_counter() - started
    assert np.array_equal(latest, versions[-1]) and np.array_equal(first, versions[0])
    return {"write_s": write_s, "read_latest_s": read_s, "read_first_s": old_s}


def run_icechunk(root: Path, versions: list[np.ndarray], chunk: int) -> dict[str, float]:
    import icechunk

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(root)))
    started = time.perf_counter()
    snapshots = []
    for k, labels in enumerate(versions):
        session = repo.writable_session("main")
        _write(session.store, labels, chunk)
        snapshots.append(session.commit(f"version {k}"))
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    latest = _read(repo.readonly_session(branch="main").store)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    first = _read(repo.readonly_session(snapshot_id=snapshots[0]).store)
    old_s = time.perf_counter() - started
    assert np.array_equal(latest, versions[-1]) and np.array_equal(first, versions[0])
    return {"write_s": write_s, "read_latest_s": read_s, "read_first_s": old_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--versions", type=int, default=3, help="versions written per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per side; the best counts")
    args = parser.parse_args()

    import icechunk

    versions = [make_labels(args.size, seed) for seed in range(args.versions)]
    workdir = Path(tempfile.mkdtemp(prefix="segflow-icechunk-"))
    sides: dict[str, list[dict[str, float]]] = {"plain": [], "icechunk": []}
    try:
        for k in range(args.repeat):  # interleaved: both sides see the same load
            sides["plain"].append(run_plain(workdir / f"plain-{k}", versions, args.chunk))
            sides["icechunk"].append(run_icechunk(workdir / f"ice-{k}", versions, args.chunk))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {
        side: {key: min(r[key] for r in runs) for key in runs[0]} for side, runs in sides.items()
    }
    result: dict[str, Any] = {
        "benchmark": "labels write/read: icechunk vs plain zarr",
        "icechunk": icechunk.__version__,
        "zarr": zarr.__version__,
        "size": args.size,
        "chunk": args.chunk,
        "versions": args.versions,
        **{f"{side}_{key}": round(v, 3) for side, row in best.items() for key, v in row.items()},
        **{
            f"ratio_{key}": round(best["icechunk"][key] / best["plain"][key], 3)
            for key in best["plain"]
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
