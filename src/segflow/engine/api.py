"""Entry points: ``segment`` for arrays in a notebook, ``segment_item`` for the flows."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segflow.engine.blocks import plan_blocks
from segflow.engine.executor import DaskExecutor, Executor, LocalExecutor, ProgressCallback
from segflow.engine.pipeline import Plan, Step, compile_pipeline
from segflow.engine.run import ArraySink, ItemRun, RegionsSpec, Sink, run_plan
from segflow.errors import PlanError
from segflow.io.base import Reader
from segflow.store.regions import ArrayRegionsSink


def segment(
    image: Any,
    pipeline: Sequence[Mapping[str, Any] | Step],
    *,
    block_shape: Sequence[int] | int | None = None,
    channel_axis: int | None = None,
    client: Any = None,
    n_threads: int | None = None,
    progress: ProgressCallback | None = None,
    regions: bool = False,
    keep_limit: int | None = None,
    spacing: Sequence[float] | None = None,
    units: str | None = None,
    nodata: float | None = None,
) -> Any:
    """Run a pipeline blockwise on an array and return the result; no Prefect needed.

    Parameters
    ----------
    image
        numpy array shaped ``(z), y, x``, with a channel axis where ``channel_axis`` says.
    pipeline
        Steps such as ``[{"op": "gaussian", "sigma": 2}, {"op": "otsu"}, {"op": "label"}]``;
        ``segflow ops`` lists the operations.
    block_shape
        Core block shape over the spatial axes; by default 2048^2 in 2D, 256^3 in 3D.
    client
        A ``distributed.Client`` to run the blocks on; by default a thread pool here.
    n_threads
        Threads of the default pool.
    progress
        Called as ``progress(phase, done, total)``.
    regions
        Also measure every object (the pipeline must end in labels) and return
        ``(labels, table)``: a pandas DataFrame with ``regionprops_table`` columns
        (``label``, ``area``, ``bbox-*``, ``centroid-*``, ``intensity_mean``, ...) where the
        intensity is the input image.
    spacing
        Physical pixel size per spatial axis (for ``distance_transform``, physical sizes and
        the regions' physical columns); 1 per axis by default.
    units
        What ``spacing`` is in (``mm``, ``um``, ...; ``pixel`` by default): a model step
        resamples to its card's spacing only when the units say how to compare them.
    nodata
        The image's nodata value (e.g. a rasterio dataset's ``nodata``), for ``mask_nodata``
        steps without a ``value``.
    keep_limit
        Bytes of intermediates kept on the workers between phases; a larger item streams
        (recomputes each phase from the input, in bounded memory). Default 1 GiB.

    Returns
    -------
    numpy.ndarray
        The output over the spatial axes: labels (consecutive ids), a mask (uint8 0/1),
        classes or a float image, depending on the pipeline's last step; a multi-channel
        output (a probability map) keeps its channel axis first.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((6, 9), dtype=np.float32)
    >>> image[1:3, 1:8] = 1; image[4:6, 2:4] = 1
    >>> segment(image, [{"op": "threshold", "value": 0.5}, {"op": "label"}], block_shape=4)
    array([[0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 1, 1, 1, 1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 1, 1, 1, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 0, 2, 2, 0, 0, 0, 0, 0],
           [0, 0, 2, 2, 0, 0, 0, 0, 0]], dtype=uint8)
    """
    from segflow.io.zarr import ArrayReader

    reader = ArrayReader(np.asarray(image), "array", channel_axis=channel_axis)
    if spacing is not None:
        reader.info = dataclasses.replace(reader.info, spacing=tuple(float(s) for s in spacing))
    if units is not None:
        reader.info = dataclasses.replace(reader.info, units=units)
    if nodata is not None:
        reader.info = dataclasses.replace(reader.info, nodata=float(nodata))
    info = reader.info
    plan = compile_pipeline(
        pipeline,
        spatial_ndim=len(info.spatial_shape),
        channels=info.n_channels,
        dtype=info.dtype,
        spacing=info.spacing,
        units=info.units,
        nodata=info.nodata,
        item=info,
    )
    if regions and plan.out_kind != "labels":
        raise PlanError(
            f"`regions` needs a pipeline that ends in labels, this one gives {plan.out_kind}"
        )
    grid = plan_blocks(info.spatial_shape, block_shape, halo=plan.halo)
    executor: Executor = DaskExecutor(client) if client is not None else LocalExecutor(n_threads)
    try:
        if client is not None:
            [reader] = client.scatter([reader], broadcast=True)
        run = run_plan(
            reader,
            plan,
            grid,
            executor,
            make_sink=lambda dtype: ArraySink(),
            spacing=info.spacing,
            regions=RegionsSpec(ArrayRegionsSink(), intensity=reader) if regions else None,
            keep_limit=keep_limit,
            progress=progress,
        )
    finally:
        if isinstance(executor, LocalExecutor):
            executor.close()
    classes = (len(plan.out_classes),) if plan.out_classes else ()
    out = np.zeros((*classes, *info.spatial_shape), dtype=run.out_dtype)
    for summary in run.blocks:
        region, data = summary.written
        out[(..., *region)] = data
    if not regions:
        return out
    from segflow.store.regions import regions_frame

    assert run.regions is not None
    from segflow.engine.pipeline import region_extras

    return out, regions_frame(
        run.regions, spacing=info.spacing, origin=info.origin, extras=region_extras(plan)
    )


def run_item(
    reader: Reader,
    plan: Plan,
    *,
    block_shape: Sequence[int] | int | None,
    executor: Executor,
    make_sink: Any,
    saved: Mapping[str, Sink] | None = None,
    storage_unit: Sequence[int] | None = None,
    regions: RegionsSpec | None = None,
    keep_limit: int | None = None,
    progress: ProgressCallback | None = None,
    records: Any = None,
    growth: Any = None,
) -> ItemRun:
    """Plan the blocks of one item and run ``plan`` on them (used by ``segment_item``)."""
    grid = plan_blocks(
        reader.info.spatial_shape, block_shape, halo=plan.halo, storage_unit=storage_unit
    )
    return run_plan(
        reader,
        plan,
        grid,
        executor,
        make_sink=make_sink,
        spacing=reader.info.spacing,
        saved=saved,
        regions=regions,
        keep_limit=keep_limit,
        progress=progress,
        records=records,
        growth=growth,
    )
