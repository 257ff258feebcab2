"""The OME-Zarr pyramid built by the blocks equals the one built by reading the item back.

Each case segments the same item twice: with the OME view (the blocks build the pyramid,
:mod:`segflow.store.pyramid`), and without it, then builds the pyramid of that second store
by reading it back (:func:`segflow.store.ome.write_pyramid`, how every pyramid was built
before). Every level must be the same array (values bit for bit, shape, dtype, chunks,
shards) and the OME metadata the same.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import zarr

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.io import ArrayReader
from segflow.io.base import Reader
from segflow.store.metadata import consolidate_item
from segflow.store.ome import write_pyramid
from segflow.store.pyramid import SCRATCH_PREFIX

LABELS = [{"op": "threshold", "value": 0.5}, {"op": "label"}]
MASK = [{"op": "threshold", "value": 0.5}]
SMOOTH = [{"op": "gaussian", "sigma": 1.0}]  # float32 output: mean pyramid
CLASSES = [{"op": "classify", "edges": [0.3, 0.6]}]


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    noise = np.random.default_rng(seed).random(shape)
    field = ndimage.uniform_filter(noise, 3)
    return ((field - field.min()) / np.ptp(field)).astype(np.float32)


def run(reader: Reader, pipeline: list[dict], store: str, **options: Any) -> Any:
    with LocalExecutor(2) as executor:
        result = segment_item(reader, pipeline, store=store, executor=executor, **options)
    assert result.status == "done", result.error
    return result


def read_back(reader: Reader, pipeline: list[dict], store: str, **options: Any) -> str:
    """The item without the OME view, then its pyramid read back: the reference."""
    result = run(reader, pipeline, store, ome=False, **options)
    output = next(
        name
        for name in zarr.open_group(store, path=reader.info.id, mode="r").array_keys()
        if name == result.output
    )
    with LocalExecutor(2) as executor:
        write_pyramid(
            store,
            reader.info,
            output,
            executor=executor,
            kind=output,
            max_levels=options.get("pyramid"),
        )
    # The item's zarr.json consolidates its nodes as committed: add the pyramid written since.
    consolidate_item(store, reader.info.id)
    return output


def assert_same_pyramids(new: str, old: str, item: str, output: str) -> None:
    group_new = zarr.open_group(new, path=item, mode="r")
    group_old = zarr.open_group(old, path=item, mode="r")
    # The item group's ome.labels (a label image) alike; its commit record is per run.
    attrs_new, attrs_old = dict(group_new.attrs), dict(group_old.attrs)
    assert attrs_new.get("ome") == attrs_old.get("ome")
    assert attrs_new.keys() == attrs_old.keys()
    pyr_new, pyr_old = group_new[f"{output}_pyramid"], group_old[f"{output}_pyramid"]
    assert dict(pyr_new.attrs) == dict(pyr_old.attrs)
    assert sorted(pyr_new.keys()) == sorted(pyr_old.keys())  # no scratch array left
    assert not any(k.startswith(SCRATCH_PREFIX) for k in pyr_new.keys())
    levels = sorted(pyr_old.array_keys(), key=int)
    assert len(levels) >= 2
    for level in levels:
        a, b = pyr_new[level], pyr_old[level]
        assert (a.shape, a.dtype, a.chunks, a.shards) == (b.shape, b.dtype, b.chunks, b.shards)
        assert a.metadata.dimension_names == b.metadata.dimension_names
        values_a, values_b = a[...], b[...]
        # Bit for bit: floats compared as their bytes (NaN, -0.0 included).
        assert values_a.tobytes() == values_b.tobytes(), f"level {level} differs"
    np.testing.assert_array_equal(pyr_new["0"][...], group_new[output][...])


CASES = [
    # (shape, block, chunks, shards, pipeline): sizes not multiples of 2, layouts where the
    # levels' units lie in one block, span blocks, or blocks that are not powers of 2.
    pytest.param((150, 131), 32, None, None, LABELS, id="labels-block-eq-chunk"),
    pytest.param((150, 131), 64, [16, 16], None, LABELS, id="labels-chunks-in-blocks"),
    pytest.param((97, 203), 48, [16, 16], [48, 48], LABELS, id="labels-sharded-block-48"),
    pytest.param((61, 77), 15, [15, 15], None, LABELS, id="labels-odd-blocks"),
    pytest.param((150, 131), 32, None, None, MASK, id="mask"),
    pytest.param((150, 131), 32, [16, 16], None, SMOOTH, id="float-mean"),
    pytest.param((99, 130), 40, [20, 20], None, SMOOTH, id="float-mean-block-40"),
    pytest.param((90, 70), 32, None, None, CLASSES, id="classes"),
    pytest.param((21, 50, 37), (8, 16, 16), None, None, LABELS, id="3d-labels"),
    pytest.param((13, 45, 38), (4, 16, 16), [4, 8, 8], None, SMOOTH, id="3d-float"),
]


@pytest.mark.parametrize(("shape", "block", "chunks", "shards", "pipeline"), CASES)
def test_blockwise_pyramid_equals_the_read_back_one(
    tmp_path: pathlib.Path,
    shape: tuple[int, ...],
    block: Any,
    chunks: Any,
    shards: Any,
    pipeline: list[dict],
) -> None:
    image = blobs(shape, seed=len(shape) + shape[0])
    options = {"block_shape": block, "chunks": chunks, "shards": shards}
    new, old = str(tmp_path / "new.zarr"), str(tmp_path / "old.zarr")
    result = run(ArrayReader(image, "a"), pipeline, new, **options)
    output = read_back(ArrayReader(image, "a"), pipeline, old, **options)
    assert result.output == output
    assert_same_pyramids(new, old, "a", output)


def test_anisotropic_volume_keeps_slices_the_same_way(tmp_path: pathlib.Path) -> None:
    """5 um slices, 1 um pixels: z is halved only from the third level on, in the blocks
    and in the read-back alike."""
    import dataclasses

    image = blobs((24, 70, 66), seed=3)
    reader = ArrayReader(image, "v")
    reader.info = dataclasses.replace(reader.info, spacing=(5.0, 1.0, 1.0))
    options = {"block_shape": (8, 16, 16), "chunks": [4, 8, 8]}
    new, old = str(tmp_path / "new.zarr"), str(tmp_path / "old.zarr")
    run(reader, LABELS, new, **options)
    read_back(reader, LABELS, old, **options)
    assert_same_pyramids(new, old, "v", "labels")
    factors = [
        d["coordinateTransformations"][0]["scale"]
        for d in dict(zarr.open_group(new, path="v/labels_pyramid").attrs)["ome"]["multiscales"][0][
            "datasets"
        ]
    ]
    assert factors[1] == [5.0, 2.0, 2.0]  # z kept at level 1


def test_capped_pyramid_equals_the_read_back_one(tmp_path: pathlib.Path) -> None:
    image = blobs((200, 190))
    options = {"block_shape": 32, "pyramid": 2}
    new, old = str(tmp_path / "new.zarr"), str(tmp_path / "old.zarr")
    run(ArrayReader(image, "a"), LABELS, new, **options)
    read_back(ArrayReader(image, "a"), LABELS, old, **options)
    assert_same_pyramids(new, old, "a", "labels")
    assert sorted(zarr.open_group(new, path="a/labels_pyramid").array_keys()) == ["0", "1", "2"]


def test_probability_map_sink_with_a_class_axis(tmp_path: pathlib.Path) -> None:
    """A multi-channel output (a leading class axis, stored whole) through the layout's
    output sink, blocks of 24 over 16^2 chunks, against the read-back."""
    from segflow.store.layout import ArraySpec
    from segflow.store.output import OmeZarrLayout

    probabilities = np.random.default_rng(2).random((2, 70, 75)).astype(np.float32)
    info = ArrayReader(np.zeros((70, 75), np.float32), "p").info
    spec = ArraySpec("probabilities", "float32", (8, 8), (24, 24), classes=("bg", "cell"))
    stores = {}
    for how in ("new", "old"):
        store = str(tmp_path / f"{how}.zarr")
        layout = OmeZarrLayout(blocks=(24, 24) if how == "new" else None)
        layout.create_item(store, info)
        create = layout.create_output if how == "new" else layout.create_array
        sink = create(store, info, spec)
        for y in range(0, 70, 24):
            for x in range(0, 75, 24):
                region = (slice(y, min(y + 24, 70)), slice(x, min(x + 24, 75)))
                sink.write(region, probabilities[(slice(None), *region)])
        with LocalExecutor(2) as executor:
            layout.finalize_item(store, info, output=spec, executor=executor)
        stores[how] = store
    assert_same_pyramids(stores["new"], stores["old"], "p", "probabilities")


def test_a_write_off_the_planned_blocks_is_refused(tmp_path: pathlib.Path) -> None:
    from segflow.errors import StoreError
    from segflow.store.layout import ArraySpec
    from segflow.store.output import OmeZarrLayout

    info = ArrayReader(np.zeros((64, 64), np.float32), "a").info
    layout = OmeZarrLayout(blocks=(32, 32))
    store = str(tmp_path / "s.zarr")
    layout.create_item(store, info)
    sink = layout.create_output(store, info, ArraySpec("mask", "uint8", (16, 16)))
    with pytest.raises(StoreError, match="does not follow the blocks"):
        sink.write((slice(16, 32), slice(0, 16)), np.ones((16, 16), np.uint8))


def test_a_resumed_item_finishes_the_same_pyramid(tmp_path: pathlib.Path) -> None:
    """Stopped halfway through its output phase, then resumed: the blocks written before
    the stop are not run again, and the pyramid still equals the read-back one."""
    from segflow.engine.interrupt import clear_stop, request_stop

    image = blobs((96, 128), seed=5)
    store, old = str(tmp_path / "out.zarr"), str(tmp_path / "old.zarr")

    def stop_halfway(label: str, done: int, total: int) -> None:
        if label.startswith("phase 2/2") and done >= total // 2:
            request_stop("test")

    def segment(progress: Any = None) -> Any:
        with LocalExecutor(2) as executor:
            return segment_item(
                ArrayReader(image, "tile"),
                LABELS,
                store=store,
                block_shape=16,
                executor=executor,
                resumable=True,
                progress=progress,
            )

    try:
        assert segment(stop_halfway).status == "interrupted"
    finally:
        clear_stop()
    resumed = segment()
    assert resumed.status == "done", resumed.error
    assert 0 < resumed.n_resumed < resumed.n_blocks
    read_back(ArrayReader(image, "tile"), LABELS, old, block_shape=16)
    assert_same_pyramids(store, old, "tile", "labels")


def test_level_0_shares_the_output_files_and_stays_apart_when_one_is_rewritten(
    tmp_path: pathlib.Path,
) -> None:
    """On a local store level 0's storage units are hard links to the output's (nothing
    encoded or stored twice); zarr replaces a unit's file when it writes it, so rewriting
    the output leaves level 0 as it was."""
    import os

    store = str(tmp_path / "s.zarr")
    run(ArrayReader(blobs((64, 64)), "a"), LABELS, store, block_shape=32)
    output, level0 = (
        pathlib.Path(store, "a", "labels", "c"),
        pathlib.Path(store, "a", "labels_pyramid", "0", "c"),
    )
    units = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
    assert len(units) == 4
    for unit in units:
        assert os.stat(output / unit).st_ino == os.stat(level0 / unit).st_ino
    before = zarr.open_array(store, path="a/labels_pyramid/0")[...]
    labels = zarr.open_array(store, path="a/labels", mode="r+")
    labels[:32, :32] = 7
    np.testing.assert_array_equal(zarr.open_array(store, path="a/labels_pyramid/0")[...], before)


def _reduceat_mean(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """The mean downsampling as segflow did it before (numpy.add.reduceat per axis)."""
    lead = data.ndim - len(factor)
    out = data.astype(np.float64)
    for axis, f in enumerate(factor, start=lead):
        if f == 1:
            continue
        n = out.shape[axis]
        starts = np.arange(0, n, f)
        counts = np.diff(np.append(starts, n)).astype(np.float64)
        out = np.add.reduceat(out, starts, axis=axis)
        out /= counts.reshape([-1 if a == axis else 1 for a in range(out.ndim)])
    return out.astype(data.dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "factor"),
    [((7, 9), (2, 2)), ((8, 8), (2, 2)), ((1, 5), (1, 2)), ((3, 5, 7), (1, 2, 2)),
     ((2, 5, 6), (2, 2)), ((5,), (2,)), ((1, 1), (2, 2)), ((9, 9), (4, 2))],
)  # fmt: skip
def test_mean_downsampling_gives_the_bits_it_gave_before(
    shape: tuple[int, ...], factor: tuple[int, ...], dtype: Any
) -> None:
    from segflow.store.ome import downsample

    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    data = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(dtype)
    data.flat[0] = np.nan if data.size > 3 else data.flat[0]
    new, old = downsample(data, factor, "mean"), _reduceat_mean(data, factor)
    assert new.dtype == old.dtype and new.shape == old.shape
    assert new.tobytes() == old.tobytes()


class RecordingExecutor(LocalExecutor):
    """Threads, with a log of what was mapped and gathered, in order."""

    def __init__(self) -> None:
        super().__init__(2)
        self.log: list[str] = []

    def map(self, fn: Any, *iterables: Any, **kwargs: Any) -> list[Any]:
        self.log.append(f"map {getattr(fn, '__name__', fn)}")
        return super().map(fn, *iterables, **kwargs)

    def gather(self, handles: Any, **kwargs: Any) -> list[Any]:
        self.log.append(f"gather {kwargs.get('label', '')}")
        return super().gather(handles, **kwargs)


@pytest.mark.parametrize("after_blocks", [True, False], ids=["with-blocks", "after-blocks"])
def test_units_across_blocks_are_submitted_with_the_blocks(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, after_blocks: bool
) -> None:
    """The second step's tasks go in with the output phase's blocks (each waits for its
    blocks), before the client waits for the blocks; where a sink is not told of the blocks'
    tasks, the finish step submits them itself. The same pyramid either way, one pyramid
    level beyond what the blocks compute included (block 24: level 3's windows of 8 pixels
    cross blocks)."""
    from segflow.store.pyramid import PyramidSink

    if not after_blocks:
        monkeypatch.setattr(PyramidSink, "after_blocks", lambda self, executor, written: None)
    image = blobs((150, 131), seed=5)
    options = {"block_shape": 24, "chunks": [12, 12]}
    new, old = str(tmp_path / "new.zarr"), str(tmp_path / "old.zarr")
    executor = RecordingExecutor()
    with executor:
        result = segment_item(
            ArrayReader(image, "a"), LABELS, store=new, executor=executor, **options
        )
    assert result.status == "done", result.error
    output = read_back(ArrayReader(image, "a"), LABELS, old, **options)
    assert_same_pyramids(new, old, "a", output)
    last_phase = max(i for i, e in enumerate(executor.log) if e.startswith("gather phase"))
    units = [i for i, e in enumerate(executor.log) if e == "map _finish_unit"]
    assert len(units) >= 2  # levels the blocks computed, and one beyond
    assert all(i < last_phase for i in units) == after_blocks
