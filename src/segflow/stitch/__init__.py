"""Stitching block results into item-wide results (labels across block faces)."""

from segflow.stitch.labels import (
    BlockObjects,
    BlockRelabel,
    MergeResult,
    ObjectRule,
    block_faces,
    decide_block,
    face_pairs,
    merge_objects,
    neighbor_offsets,
    smallest_label_dtype,
)

__all__ = [
    "BlockObjects",
    "BlockRelabel",
    "MergeResult",
    "ObjectRule",
    "block_faces",
    "decide_block",
    "face_pairs",
    "merge_objects",
    "neighbor_offsets",
    "smallest_label_dtype",
]
