"""The OME-Zarr 0.5 view of an item: validates, matches the item's spacing, opens in readers.

Every store written here is also opened with xarray: one store serves both.
"""

from __future__ import annotations

import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels

from segflow.engine.executor import LocalExecutor
from segflow.engine.item import segment_item
from segflow.errors import StoreError
from segflow.io import ArrayReader, open_item
from segflow.io.base import Reader
from segflow.store.ome import downsample, plan_levels, write_pyramid
from segflow.store.writers import WriteTarget, get_writer

DATA = pathlib.Path(__file__).parents[1] / "data"
LABELS = [{"op": "threshold", "value": 0.5}, {"op": "label"}]


def segment(
    reader: Reader, pipeline: list[dict], store: str, block: int = 64, **options: object
) -> None:
    with LocalExecutor(2) as executor:
        result = segment_item(
            reader, pipeline, store=store, block_shape=block, executor=executor, **options
        )
    assert result.status == "done", result.error


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random blobs: a smoothed noise field, thresholded by the pipeline at 0.5."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).random(shape)
    field = ndimage.uniform_filter(noise, 5)
    return ((field - field.min()) / np.ptp(field)).astype(np.float32)


def transforms(dataset: dict) -> tuple[list[float], list[float]]:
    scale, translation = dataset["coordinateTransformations"]
    return scale["scale"], translation["translation"]


@pytest.fixture
def geo_store(tmp_path: pathlib.Path) -> tuple[str, str]:
    """The bundled aerial GeoTIFF (north-up, 300 m pixels) segmented into labels."""
    store = str(tmp_path / "aerial.zarr")
    reader = open_item(str(DATA / "aerial" / "RGB.byte.tif"))
    pipeline = [{"op": "luma"}, {"op": "otsu"}, {"op": "label", "connectivity": 1}]
    segment(reader, pipeline, store, block=256)
    return store, reader.info.id


def test_labels_item_is_a_valid_ome_zarr_labels_group(geo_store: tuple[str, str]) -> None:
    store, item = geo_store
    group = zarr.open_group(store, path=item, mode="r")
    labels = Labels.from_zarr(group)  # raises unless OME-Zarr 0.5 valid
    assert labels.attributes.ome.labels == ["labels_pyramid"]
    image = ImageLabel.from_zarr(group["labels_pyramid"])
    assert image.attributes.ome.version == "0.5"
    ome = dict(group["labels_pyramid"].attrs)["ome"]
    multiscale = ome["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["y", "x"]
    assert {a["unit"] for a in multiscale["axes"]} == {"meter"}
    # 718 x 791 in 256^2 chunks: halved twice until one chunk holds a level.
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1", "2"]
    info = open_item(str(DATA / "aerial" / "RGB.byte.tif")).info
    for level, dataset in enumerate(multiscale["datasets"]):
        scale, translation = transforms(dataset)
        np.testing.assert_allclose(scale, [abs(s) * 2**level for s in info.spacing])
        # Nearest keeps each window's first pixel: its centre is the item's origin. The
        # north-up y (negative spacing) is given negated, as OME scales are positive.
        np.testing.assert_allclose(translation, [-info.origin[0], info.origin[1]])
    assert ome["image-label"]["colors"][0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}


def test_labels_pyramid_is_nearest_downsampling_of_level_0(geo_store: tuple[str, str]) -> None:
    store, item = geo_store
    group = zarr.open_group(store, path=item, mode="r")
    full = group["labels"][:]
    pyramid = group["labels_pyramid"]
    np.testing.assert_array_equal(pyramid["0"][:], full)
    for level in (1, 2):
        step = 2**level
        np.testing.assert_array_equal(pyramid[str(level)][:], full[::step, ::step])


def test_item_still_opens_in_xarray_with_coordinates_and_crs(geo_store: tuple[str, str]) -> None:
    store, item = geo_store
    ds = xr.open_zarr(store, group=item, consolidated=False)
    assert ds["labels"].dims == ("y", "x")
    assert set(ds.data_vars) == {"labels"}  # the pyramid group is not mixed into the view
    assert "crs_wkt" in ds["spatial_ref"].attrs
    assert ds["labels"].attrs["grid_mapping"] == "spatial_ref"
    info = open_item(str(DATA / "aerial" / "RGB.byte.tif")).info
    first_two = [info.origin[0], info.origin[0] + info.spacing[0]]
    np.testing.assert_allclose(ds["y"].values[:2], first_two)


def test_volume_with_anisotropic_mm_spacing(tmp_path: pathlib.Path) -> None:
    # nibabel's (x, y, z) with 0.5 mm pixels and 2.5 mm slices: z is kept until y/x are
    # coarse enough (2.5 < 2 * 2.0 at level 2), then halved with them until (4, 16, 16)
    # chunks hold a level.
    volume = blobs((80, 72, 12), seed=1)
    affine = np.diag([0.5, 0.5, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 40.0)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    reader = open_item(str(path))
    info = reader.info
    store = str(tmp_path / "vol.zarr")
    with LocalExecutor(2) as executor:
        result = segment_item(
            reader, LABELS, store=store, block_shape=(4, 16, 16), executor=executor
        )
    assert result.status == "done", result.error
    group = zarr.open_group(store, path=info.id, mode="r")
    Labels.from_zarr(group)
    multiscale = dict(group["labels_pyramid"].attrs)["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in multiscale["axes"]} == {"millimeter"}
    levels = plan_levels(info.spatial_shape, info.spacing, (4, 16, 16))
    assert [lv.factor for lv in levels] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16)]
    full = group["labels"][:]
    for level, dataset in zip(levels, multiscale["datasets"], strict=True):
        scale, translation = transforms(dataset)
        np.testing.assert_allclose(
            scale, [abs(s) * f for s, f in zip(info.spacing, level.factor, strict=True)]
        )
        np.testing.assert_allclose(
            translation,
            [o if s > 0 else -o for o, s in zip(info.origin, info.spacing, strict=True)],
        )
        fz, fy, fx = level.factor
        np.testing.assert_array_equal(
            group["labels_pyramid"][level.path][:], full[::fz, ::fy, ::fx]
        )
    ds = xr.open_zarr(store, group=info.id, consolidated=False)
    assert ds["labels"].dims == ("z", "y", "x")
    np.testing.assert_allclose(np.diff(ds["z"].values[:2]), [info.spacing[0]])


def test_mask_item_is_a_valid_label_image_with_a_colour(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "mask.zarr")
    segment(ArrayReader(blobs((150, 130)), "plate"), [{"op": "threshold", "value": 0.5}], store)
    group = zarr.open_group(store, path="plate", mode="r")
    Labels.from_zarr(group)
    ome = dict(group["mask_pyramid"].attrs)["ome"]
    assert {"label-value": 1, "rgba": [255, 200, 0, 255]} in ome["image-label"]["colors"]
    axes = ome["multiscales"][0]["axes"]
    assert all("unit" not in a for a in axes)  # pixel units: no OME unit
    full = group["mask"][:]
    np.testing.assert_array_equal(group["mask_pyramid"]["1"][:], full[::2, ::2])
    assert "mask" in xr.open_zarr(store, group="plate", consolidated=False)


def test_float_output_gets_a_mean_image_pyramid(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "float.zarr")
    image = blobs((70, 90))
    segment(ArrayReader(image, "smooth"), [{"op": "gaussian", "sigma": 1.0}], store)
    group = zarr.open_group(store, path="smooth", mode="r")
    name = next(k for k in group.group_keys())
    Image.from_zarr(group[name])
    full = group[name.removesuffix("_pyramid")][:]
    expected = downsample(full, (2, 2), "mean")
    np.testing.assert_allclose(group[name]["1"][:], expected, rtol=1e-6)  # float32 sums
    np.testing.assert_allclose(expected[0, 0], full[:2, :2].mean(), rtol=1e-6)
    _, translation = transforms(dict(group[name].attrs)["ome"]["multiscales"][0]["datasets"][1])
    assert translation == [0.5, 0.5]  # the centre of the first 2x2 window


def test_ome_off_writes_the_xarray_layout_only(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "plain.zarr")
    segment(ArrayReader(blobs((40, 40)), "a"), LABELS, store, ome=False)
    group = zarr.open_group(store, path="a", mode="r")
    assert list(group.group_keys()) == []
    assert "ome" not in dict(group.attrs)


def test_pyramid_option_caps_levels(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "capped.zarr")
    segment(ArrayReader(blobs((300, 300)), "a"), LABELS, store, pyramid=1)
    group = zarr.open_group(store, path="a/labels_pyramid", mode="r")
    assert sorted(group.array_keys()) == ["0", "1"]


def test_the_ome_writer_refuses_a_half_written_pyramid(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "half.zarr")
    reader = ArrayReader(blobs((200, 200)), "a")
    segment(reader, LABELS, store, ome=False)
    with LocalExecutor(2) as executor:
        derived = write_pyramid(store, reader.info, "labels", executor=executor)
    # The OME writer's commit check: every level of its state (path -> dtype, shape).
    ome = get_writer("ome")
    assert ome.verify is not None
    target = WriteTarget(store, reader.info, "labels", None, states={"ome": derived})
    ome.verify(target, ome.settings(), sorted(derived))
    shutil.rmtree(pathlib.Path(store) / "a" / "labels_pyramid" / "1" / "c" / "1")
    with pytest.raises(StoreError, match=r"array 'labels_pyramid/1' has 2 of its 4 storage"):
        ome.verify(target, ome.settings(), sorted(derived))


def test_napari_reader_path_opens_a_labels_layer(geo_store: tuple[str, str]) -> None:
    """What napari-ome-zarr does with ``STORE/ITEM``: ome_zarr's Reader finds the labels."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    store, item = geo_store
    location = parse_url(f"{store}/{item}")
    assert location is not None
    nodes = list(Reader(location)())
    labelled = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(labelled) == 1
    node = labelled[0]
    full = zarr.open_array(store, path=f"{item}/labels", mode="r")
    assert [d.shape for d in node.data] == [(718, 791), (359, 396), (180, 198)]
    np.testing.assert_array_equal(np.asarray(node.data[0]), full[:])
    assert node.load(Label) is not None  # napari-ome-zarr's test for a labels layer
    assert node.metadata["name"] == "labels"  # the layer's name: the multiscale's


def test_probabilities_pyramid_keeps_the_class_axis_whole(tmp_path: pathlib.Path) -> None:
    from segflow.store.layout import ArraySpec
    from segflow.store.output import OmeZarrLayout

    store = str(tmp_path / "prob.zarr")
    reader = ArrayReader(np.zeros((40, 50), np.float32), "p")
    layout = OmeZarrLayout()
    layout.create_item(store, reader.info)
    spec = ArraySpec("probabilities", "float32", (16, 16), classes=("background", "cell"))
    sink = layout.create_array(store, reader.info, spec)
    probabilities = np.random.default_rng(2).random((2, 40, 50)).astype(np.float32)
    for y in range(0, 40, 16):
        for x in range(0, 50, 16):
            region = (slice(y, y + 16), slice(x, x + 16))
            sink.write(region, probabilities[(slice(None), *region)])
    with LocalExecutor(2) as executor:
        derived = layout.finalize_item(store, reader.info, output=spec, executor=executor)
    assert derived["probabilities_pyramid/1"] == ("float32", (2, 20, 25))
    group = zarr.open_group(store, path="p/probabilities_pyramid", mode="r")
    Image.from_zarr(group)
    axes = dict(group.attrs)["ome"]["multiscales"][0]["axes"]
    assert axes[0] == {"name": "class", "type": "channel"}
    # float32 window means, computed in float64 and rounded once: 1e-6 relative.
    np.testing.assert_allclose(group["1"][:], downsample(probabilities, (2, 2), "mean"), rtol=1e-6)
    np.testing.assert_allclose(
        group["1"][:, 0, 0], probabilities[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6
    )
    # Not a label image: the item group lists no labels.
    assert "ome" not in dict(zarr.open_group(store, path="p", mode="r").attrs)


def test_object_store_gets_the_same_view(tmp_path: pathlib.Path) -> None:
    """An fsspec URL store (no rename: written in place, as on s3://) validates too."""
    store = f"memory://{tmp_path.name}/out.zarr"
    segment(ArrayReader(blobs((100, 90)), "m"), LABELS, store, block=32)
    group = zarr.open_group(store, path="m", mode="r")
    Labels.from_zarr(group)
    full = group["labels"][:]
    for level in ("1", "2"):
        step = 2 ** int(level)
        np.testing.assert_array_equal(group["labels_pyramid"][level][:], full[::step, ::step])


def test_class_map_colours_and_names_become_image_label_metadata(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "classes.zarr")
    step = {
        "op": "classify",
        "edges": [0.3, 0.6],
        "names": ["low", "mid", "high"],
        "colors": ["#000080", "#00ff00", "#ff000080"],
    }
    segment(ArrayReader(blobs((90, 80)), "c"), [step], store)
    group = zarr.open_group(store, path="c", mode="r")
    Labels.from_zarr(group)
    (name,) = list(group.group_keys())
    label = dict(group[name].attrs)["ome"]["image-label"]
    assert label["colors"] == [
        {"label-value": 0, "rgba": [0, 0, 0, 0]},
        {"label-value": 1, "rgba": [0, 0, 128, 255]},
        {"label-value": 2, "rgba": [0, 255, 0, 255]},
        {"label-value": 3, "rgba": [255, 0, 0, 128]},
    ]
    assert [p["name"] for p in label["properties"]] == ["background", "low", "mid", "high"]
    ds = xr.open_zarr(store, group="c", consolidated=False)
    output = name.removesuffix("_pyramid")
    assert list(ds[f"{output}_name"].values) == ["low", "mid", "high"]


def test_named_classes_without_colours_get_palette_colours() -> None:
    from ome_zarr_models.v05.image_label_types import Label

    from segflow.store.ome import image_label_metadata

    metadata = image_label_metadata("classes", [(1, "air", None), (2, "bone", "#ffffff")])
    assert metadata["colors"][1:] == [
        {"label-value": 1, "rgba": [31, 119, 180, 255]},
        {"label-value": 2, "rgba": [255, 255, 255, 255]},
    ]
    Label.model_validate(metadata)  # colours and names cover the same values


def test_napari_plugin_reader_gives_a_labels_layer(geo_store: tuple[str, str]) -> None:
    """napari-ome-zarr's own reader hook, as napari calls it on `napari STORE/ITEM` (no
    window: the hook returns the layer data napari would add)."""
    import warnings

    store, item = geo_store
    with warnings.catch_warnings():  # napari's own deprecation warnings (pydantic, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        reader_module = pytest.importorskip(
            "napari_ome_zarr._reader", reason="napari-ome-zarr (a dev dependency, with napari)"
        )
        reader = reader_module.napari_get_reader(f"{store}/{item}")
        assert reader is not None
        layers = reader(f"{store}/{item}")

    kinds = [kind for _data, _meta, kind in layers]
    assert kinds == ["labels"]
    data, meta, _ = layers[0]
    full = zarr.open_array(store, path=f"{item}/labels", mode="r")
    assert [level.shape for level in data] == [(718, 791), (359, 396), (180, 198)]
    np.testing.assert_array_equal(np.asarray(data[0]), full[:])
    # Physical pixel size from the multiscales' scale (north-up y appears positive).
    np.testing.assert_allclose(meta["scale"], [300.041782729805, 300.0379266750948])
