"""``segflow export STORE --format cog|coco|cvat|geojson``: a store's outputs in the formats
GIS and annotation tools open (no Prefect, no cluster: the engine reads the store)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_INVALID = 2  # as the other commands: nothing was written


class ExportFormat(enum.StrEnum):
    cog = "cog"
    coco = "coco"
    cvat = "cvat"
    geojson = "geojson"


def export(
    store: Annotated[str, typer.Argument(help="A segflow output store (folder or URL).")],
    format_: Annotated[
        ExportFormat,
        typer.Option("--format", help="cog: rasters for GIS tools; coco, cvat, geojson: polygons."),
    ],
    item: Annotated[
        list[str] | None,
        typer.Option(
            "--item", metavar="ID", help="Export this item only (repeatable); default: every item."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="cog: a folder (or a .tif for one item and array); coco, cvat, geojson: the "
            "file. "
            "Default: beside the store, named after it.",
        ),
    ] = None,
    array: Annotated[
        list[str] | None,
        typer.Option(
            "--array",
            metavar="NAME",
            help="cog: arrays to write (default: every 2-D integer array: labels, "
            "masks, class maps); coco, cvat, geojson: the label array (default labels).",
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Polygon simplification, in pixels (0: exact).")
    ] = 0.0,
    crs: Annotated[
        bool, typer.Option("--crs", help="geojson: CRS coordinates instead of pixels.")
    ] = False,
    category: Annotated[
        str, typer.Option(help="coco, cvat: the objects' category (label) name.")
    ] = "object",
    tile: Annotated[int, typer.Option(help="cog: tile side, a multiple of 16.")] = 512,
    classes: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="coco, cvat: each object's category from this class map (the class most of its "
            "pixels have), e.g. classes.",
        ),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            metavar="WHEN",
            help="Export the items as they were then: a tag, a run id or name, or an ISO "
            "time (UTC unless it says). Default: the latest version.",
        ),
    ] = None,
) -> None:
    """Export a store's labels as COGs, or its objects as COCO JSON, CVAT XML or GeoJSON
    polygons.

    Exit status 2, with one line, when the store, an item or an array cannot be exported.
    """
    from segflow.errors import StoreError

    try:
        if format_ is ExportFormat.cog:
            if tile <= 0 or tile % 16:
                raise StoreError(f"--tile ({tile}) must be a positive multiple of 16")
            _export_cogs(store, item, out, array, tile, as_of)
        else:
            if crs and format_ is not ExportFormat.geojson:
                raise StoreError(
                    f"--crs: {format_.value.upper()} polygons are in pixel coordinates; drop --crs"
                )
            options = {"tolerance": tolerance, "crs": crs, "category": category, "classes": classes}
            _export_polygons(store, format_, item, out, array, options, as_of)
    except StoreError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(EXIT_INVALID) from None


def _default_out(store: str, suffix: str) -> Path:
    """``STORE`` without ``.zarr``, plus ``suffix``, beside a local store (in the current
    folder for a URL)."""
    path = Path(store.rstrip("/")) if "://" not in store else Path(store.rstrip("/")).name
    path = Path(path)
    return path.with_name(path.name.removesuffix(".zarr") + suffix)


def _export_cogs(
    store: str,
    item_ids: list[str] | None,
    out: Path | None,
    arrays: list[str] | None,
    tile: int,
    as_of: str | None = None,
) -> None:
    from segflow.errors import StoreError
    from segflow.export import stored_items
    from segflow.export.cog import cog_arrays, write_cog

    items = stored_items(store, item_ids, as_of=as_of)
    jobs = [(i, a) for i in items for a in (arrays or cog_arrays(i))]
    if not jobs:
        raise StoreError(f"store '{store}': no 2-D integer array to write as a COG")
    target = out or _default_out(store, ".cog")
    single = target.suffix.lower() in (".tif", ".tiff")
    if single and len(jobs) > 1:
        raise StoreError(
            f"--out {str(target)!r} is one file for {len(jobs)} arrays: give a folder, or "
            "--item and --array"
        )
    if not single:
        target.mkdir(parents=True, exist_ok=True)
    for stored, name in jobs:
        path = target if single else target / f"{stored.id}.{name}.tif"
        result = write_cog(stored, name, path, block=tile)
        levels = " ".join(str(f) for f in result.overviews) or "none"
        typer.echo(
            f"{stored.id} {name} -> {result.path} ({result.shape[1]} x {result.shape[0]}, "
            f"overviews {levels}, {_crs_label(stored.crs_wkt)})"
        )


def _crs_label(wkt: str | None) -> str:
    if not wkt:
        return "no CRS"
    from rasterio.crs import CRS

    code = CRS.from_wkt(wkt).to_epsg()
    return f"EPSG:{code}" if code else "CRS from WKT"


SUFFIXES = {"coco": ".coco.json", "cvat": ".cvat.xml", "geojson": ".geojson"}


def _export_polygons(
    store: str,
    format_: ExportFormat,
    item_ids: list[str] | None,
    out: Path | None,
    arrays: list[str] | None,
    options: dict[str, Any],
    as_of: str | None = None,
) -> None:
    from segflow.errors import StoreError
    from segflow.export import stored_items
    from segflow.export.coco import coco_document
    from segflow.export.cvat import cvat_document
    from segflow.export.geojson import geojson_document
    from segflow.export.polygons import item_polygons, object_classes

    tolerance, crs, classes = options["tolerance"], options["crs"], options["classes"]
    if classes and format_ is ExportFormat.geojson:
        raise StoreError("--classes: categories are written to COCO and CVAT files only")
    if arrays and len(arrays) > 1:
        raise StoreError(f"--array: one label array for polygons, got {len(arrays)}")
    name = arrays[0] if arrays else "labels"
    items = stored_items(store, item_ids, as_of=as_of)
    polygons = [item_polygons(i, name) for i in items]
    found = [object_classes(i, name, classes) for i in items] if classes else None
    text: str
    if format_ is ExportFormat.coco:
        document = coco_document(
            polygons, tolerance=tolerance, category=options["category"], classes=found
        )
        text = json.dumps(document, separators=(",", ":"))
    elif format_ is ExportFormat.cvat:
        text = cvat_document(
            polygons, tolerance=tolerance, category=options["category"], classes=found,
            task=Path(store.rstrip("/")).name,
        )  # fmt: skip
    else:
        document = geojson_document(polygons, tolerance=tolerance, crs=crs)
        text = json.dumps(document, separators=(",", ":"))
    target = out or _default_out(store, SUFFIXES[format_])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(text)
    partial.replace(target)
    count = sum(len(p.labels) for p in polygons)
    where = "CRS" if crs else "pixel"
    typer.echo(
        f"{count} objects of {len(polygons)} item(s) -> {target} ({format_.value}, {where} "
        f"coordinates, tolerance {tolerance:g} px)"
    )
