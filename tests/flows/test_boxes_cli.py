"""`segflow validate` with a from_boxes step: boxes for files not in the collection."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from segflow.flows.cli import app

NUCLEI = Path(__file__).resolve().parents[1] / "data" / "nuclei"


def test_validate_lists_boxes_for_files_not_in_the_collection(tmp_path: Path) -> None:
    (tmp_path / "boxes.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label\n"
        "003cee89357d9fe1/image.png,1,1,5,5,n\nmissing.png,1,1,5,5,n\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"input: {{path: '{NUCLEI}/*/image.png'}}\noutput: {{store: out.zarr}}\n"
        "pipeline:\n  - {op: from_boxes, boxes: boxes.csv}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"{config}: pipeline[0] 'from_boxes': {str(tmp_path / 'boxes.csv')!r}: 1 box(es) for "
        "'missing.png' match no item of the collection"
    ]
    (tmp_path / "boxes.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label\n003cee89357d9fe1/image.png,1,1,5,5,n\n"
    )
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
