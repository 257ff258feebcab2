"""A growing scene: the run after a tile arrives, against a fresh run on the grown scene.

``--tiles`` (a square number) tiles of ``--tile``^2 pixels as in ``bench_scene.py`` (3-band
uint8, deflate, one CRS, abutting), the centre tile left out at first (a hole). The pipeline
is configs/aerial.yaml's with a fixed threshold for its Otsu (nodata, luma, gaussian,
threshold 128, opening, label) in 256^2 blocks, labels only. In one process, on the
in-process executor with 2 threads:

- ``first``: the scene with its hole;
- ``grown``: the centre tile written, the same store run again: it grows (reused blocks
  run no step);
- ``fresh``: the grown scene into a new store.

Prints a line per run, the ratio grown / fresh, then, last, a JSON object.

Run: ``python benchmarks/bench_scene_growth.py --tiles 16 --tile 1024``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scene import write_tiles

PIPELINE: list[dict[str, Any]] = [
    {"op": "mask_nodata"},
    {"op": "luma"},
    {"op": "gaussian", "sigma": 1.0},
    {"op": "threshold", "value": 128},
    {"op": "binary_opening", "radius": 1},
    {"op": "label", "connectivity": 1},
]


def timed_run(folder: Path, store: Path) -> tuple[float, Any]:
    from segflow.engine.executor import LocalExecutor
    from segflow.engine.item import segment_item
    from segflow.io import open_item

    started = time.perf_counter()
    with LocalExecutor(2) as executor:
        result = segment_item(
            open_item(str(folder), mosaic=True),
            PIPELINE,
            store=str(store),
            block_shape=256,
            executor=executor,
            ome=False,
            resumable=True,
        )
    assert result.status == "done", result.error
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--tile", type=int, default=1024)
    args = parser.parse_args()
    side = round(args.tiles**0.5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scene"
        folder.mkdir()
        paths = write_tiles(folder, args.tiles, args.tile)
        centre = paths[(side // 2) * side + side // 2]
        aside = Path(tmp) / centre.name
        centre.rename(aside)
        first, _ = timed_run(folder, Path(tmp) / "out.zarr")
        aside.rename(centre)
        grown, result = timed_run(folder, Path(tmp) / "out.zarr")
        fresh, fresh_result = timed_run(folder, Path(tmp) / "fresh.zarr")
    figures = {
        "tiles": args.tiles,
        "tile": args.tile,
        "blocks": result.n_blocks,
        "reused": result.n_reused,
        "first_s": round(first, 2),
        "grown_s": round(grown, 2),
        "fresh_s": round(fresh, 2),
        "grown_over_fresh": round(grown / fresh, 3),
        "objects": result.object_count,
        "fresh_objects": fresh_result.object_count,
    }
    print(f"first (with a hole): {first:.2f} s")
    print(f"grown: {grown:.2f} s, {result.n_reused} of {result.n_blocks} blocks reused")
    print(f"fresh: {fresh:.2f} s; grown / fresh {grown / fresh:.3f}")
    assert np.isclose(result.object_count, fresh_result.object_count)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
