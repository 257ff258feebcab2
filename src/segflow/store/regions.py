"""Per-object tables beside the labels: ``STORE/ITEM_ID/regions.parquet``.

Workers write one part per block for the objects complete inside it, the client one part for
the objects that span blocks (merged from their face rows); the client then streams the parts
into the single file, one row group per part (a folder of parts inside the item's group
would look like a broken Zarr node to zarr's metadata consolidation). Rows are not in label
order: :func:`read_regions` sorts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import PlanError
from segflow.faults import fault_point
from segflow.stitch.regions import RegionPartial, region_columns
from segflow.store.fs import fresh_fs

if TYPE_CHECKING:
    import pandas as pd

REGIONS_NAME = "regions.parquet"
PARTS_NAME = "regions.parts"  # scratch folder, removed once the parts are joined


SORT_ROWS = 5_000_000  # region rows sorted by label in memory when joined (~1 GB at most)


class ParquetRegionsSink:
    """Writes parts of one item's region table; picklable (a path and the item's geometry)."""

    def __init__(
        self,
        store: str,
        item_id: str,
        *,
        spacing: Sequence[float],
        origin: Sequence[float],
        units: str,
        crs_wkt: str | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        group = f"{str(store).rstrip('/')}/{item_id}"
        self.extras = dict(extras or {})  # columns by object id (the box each came from)
        self.path = f"{group}/{REGIONS_NAME}"
        self.parts = f"{group}/{PARTS_NAME}"
        self.spacing = tuple(float(s) for s in spacing)
        self.origin = tuple(float(o) for o in origin)
        self.units = units
        # Areas in m^2 beside the square degrees of a geographic CRS.
        self.ellipsoid = ellipsoid_of(crs_wkt) if units == "degree" and crs_wkt else None

    def write(self, name: str, rows: RegionPartial) -> None:
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = region_columns(
            rows, spacing=self.spacing, origin=self.origin, ellipsoid=self.ellipsoid
        )
        add_extras(columns, self.extras)
        units = {"segflow.units": self.units, "segflow.area_physical_units": self._area_units}
        if self.ellipsoid is not None:
            units["segflow.area_m2"] = (
                "ellipsoidal area (a={}, 1/f={}) of a pixel at the object's centroid "
                "latitude, times its pixel count".format(*self.ellipsoid)
            )
        table = pa.table(columns).replace_schema_metadata(units)
        with fsspec.open(f"{self.parts}/{name}.parquet", "wb", auto_mkdir=True) as handle:
            pq.write_table(table, handle)

    def join(self) -> None:
        """Join every part into ``regions.parquet``, sorted by label, and drop the parts
        (on the client). Up to :data:`SORT_ROWS` rows are sorted in memory (about 200 B a
        row); a larger table is streamed part by part, each part sorted."""
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, parts = fresh_fs(self.parts)
        names = sorted(fs.glob(f"{parts}/*.parquet"))
        rows = 0
        for name in names:
            with fs.open(name, "rb") as part:
                rows += pq.ParquetFile(part).metadata.num_rows
        writer = None
        try:
            with fsspec.open(self.path, "wb", auto_mkdir=True) as handle:
                tables = []
                for name in names:
                    with fs.open(name, "rb") as part:
                        table = pq.read_table(part).sort_by("label")
                    if rows <= SORT_ROWS:
                        tables.append(table)
                        continue
                    if writer is None:
                        writer = pq.ParquetWriter(handle, table.schema)
                    writer.write_table(table)
                if tables:
                    whole = pa.concat_tables(tables).sort_by("label")
                    writer = pq.ParquetWriter(handle, whole.schema)
                    writer.write_table(whole)
                if writer is not None:
                    writer.close()
            fault_point("regions-joined")  # the table written, its parts not yet removed
        finally:
            fs.rm(parts, recursive=True)

    @property
    def _area_units(self) -> str:
        return f"{self.units}^{len(self.spacing)}"

    def clear(self) -> None:
        """Remove an earlier run's table and parts (the item is being rewritten)."""

        for target in (self.path, self.parts):
            fs, path = fresh_fs(target)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def area_percentiles(self, quantiles: Sequence[float]) -> list[float | None]:
        """Percentiles of the object areas in pixels (``None`` without objects)."""
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(self.path, "rb") as handle:
            values = pq.read_table(handle, columns=["area"])["area"].to_numpy()
        if len(values) == 0:
            return [None for _ in quantiles]
        return [float(v) for v in np.percentile(values, [100 * q for q in quantiles])]


class ArrayRegionsSink:
    """Hands finished rows back to the caller (the notebook API)."""

    def write(self, name: str, rows: RegionPartial) -> RegionPartial:
        return rows


def check_regions(out_kind: str) -> None:
    """Refuse ``output.regions`` for a pipeline that does not end in labels (callers name
    the item).

    Raises
    ------
    PlanError
        Naming what the pipeline gives and the two ways out.
    """
    if out_kind != "labels":
        raise PlanError(
            f"`output.regions` (true) needs a pipeline that ends in labels, this one gives "
            f"{out_kind}: set output.regions: false or end the pipeline with a label step"
        )


def read_regions(store: str, item_id: str) -> pd.DataFrame:
    """One item's region table as a pandas DataFrame, sorted by label."""
    import pandas as pd

    from segflow.store.versions import resolve_item

    frame = pd.read_parquet(f"{resolve_item(store, item_id)}/{REGIONS_NAME}")
    return frame.sort_values("label", ignore_index=True)


def add_extras(columns: dict[str, np.ndarray], extras: Mapping[str, np.ndarray]) -> None:
    """Add each of ``extras`` (values indexed by object id) as a column of the rows."""
    for name, values in extras.items():
        columns[name] = np.asarray(values)[columns["label"]]


def regions_frame(
    parts: Sequence[RegionPartial],
    *,
    extras: Mapping[str, np.ndarray] | None = None,
    **geometry: Any,
) -> pd.DataFrame:
    """Finished rows (from :class:`ArrayRegionsSink`) as one DataFrame sorted by label;
    ``extras`` are more columns indexed by object id."""
    import pandas as pd

    from segflow.stitch.regions import merge_rows

    columns = region_columns(merge_rows(parts), **geometry)
    add_extras(columns, extras or {})
    return pd.DataFrame(columns).sort_values("label", ignore_index=True)


def ellipsoid_of(crs_wkt: str) -> tuple[float, float]:
    """Semi-major axis (m) and inverse flattening of a CRS's ellipsoid, from its WKT (WGS 84
    where the WKT names none).

    Examples
    --------
    >>> ellipsoid_of('GEOGCS["NAD83",DATUM["x",SPHEROID["GRS 1980",6378137,298.257222101]]]')
    (6378137.0, 298.257222101)
    """
    import re

    found = re.search(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([0-9.eE+-]+),\s*([0-9.eE+-]+)', crs_wkt)
    if found is None:
        return 6378137.0, 298.257223563
    return float(found.group(1)), float(found.group(2))
