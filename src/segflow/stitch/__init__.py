"""Stitching block results into item-wide results (labels across block faces)."""

from segflow.stitch.labels import (
    BlockRelabel,
    MergeResult,
    block_faces,
    face_pairs,
    merge_labels,
    neighbor_offsets,
    smallest_label_dtype,
)

__all__ = [
    "BlockRelabel",
    "MergeResult",
    "block_faces",
    "face_pairs",
    "merge_labels",
    "neighbor_offsets",
    "smallest_label_dtype",
]
