"""A folder of 2-D slices (an EM or confocal stack exported one file per section) as one volume.

Asked for with ``input.options: {stack: {...}}``: every folder the input names is then one
item, its slices the files some reader takes, in natural order of their names (``2.png``
before ``10.png``), or those matching ``pattern``. Every slice must have the first one's
shape, channels and dtype. The z spacing is stated by the user (a file name carries none):
``spacing: [z, y, x]`` with ``units``; without it the slices' own spacing is kept in-plane
and z is 1.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from segflow.errors import ItemReadError
from segflow.io._common import check_region, sanitize_id, strip_file_scheme
from segflow.io.base import ItemInfo, Reader

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: ``s2`` before ``s10``.

    Examples
    --------
    >>> sorted(["10.png", "9.png", "0.png"], key=natural_key)
    ['0.png', '9.png', '10.png']
    """
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]


class StackReader:
    """Reads of a folder of 2-D slices as ``(c, z, y, x)``.

    Parameters
    ----------
    folder : str
        The folder whose files are the slices (not searched recursively).
    item_id : str, optional
        Item id; defaults to the folder name.
    spacing : sequence of 3 floats, optional
        ``(z, y, x)`` voxel size in ``units``; default: 1 along z, the slices' in-plane
        spacing.
    units : str, optional
        Units of ``spacing`` (``nm``, ``um``, ``mm``); required with ``spacing``.
    pattern : str, optional
        A glob on file names (``"*.png"``); default: every file a reader takes.

    Raises
    ------
    ItemReadError
        If the folder has no slice, a slice is not 2-D, or slices differ in shape, channels
        or dtype (naming the first file that differs).
    """

    info: ItemInfo

    def __init__(
        self,
        folder: str,
        item_id: str | None = None,
        *,
        spacing: Sequence[float] | None = None,
        units: str | None = None,
        pattern: str | None = None,
    ) -> None:
        from segflow.io.discover import open_item
        from segflow.io.registry import might_open

        self.path = strip_file_scheme(folder).rstrip("/")
        if not os.path.isdir(self.path):
            raise ItemReadError(f"item '{self.path}': a stack is a folder of slices")
        names = sorted(
            (
                name
                for name in os.listdir(self.path)
                if not name.startswith(".")
                and os.path.isfile(os.path.join(self.path, name))
                and (fnmatch.fnmatch(name, pattern) if pattern else True)
                and might_open(os.path.join(self.path, name))
            ),
            key=natural_key,
        )
        if not names:
            looked = f"files matching {pattern!r}" if pattern else "image files"
            raise ItemReadError(f"item '{self.path}': no slices ({looked}) in the folder")
        self.files = [os.path.join(self.path, name) for name in names]
        self._slices: dict[int, Reader] = {}
        first = open_item(self.files[0])
        if len(first.info.spatial_shape) != 2:
            raise ItemReadError(
                f"item '{self.path}': slice {names[0]} is {first.info.spatial_shape}, "
                "not 2-D; a stack is made of 2-D slices"
            )
        for name, path in zip(names[1:], self.files[1:], strict=True):
            other = open_item(path).info
            if (other.shape, other.dtype) != (first.info.shape, first.info.dtype):
                raise ItemReadError(
                    f"item '{self.path}': slice {name} is {other.shape} {other.dtype}, the "
                    f"first ({names[0]}) {first.info.shape} {first.info.dtype}; every slice "
                    "must match"
                )
        if spacing is not None:
            if len(spacing) != 3 or units is None:
                raise ItemReadError(
                    f"item '{self.path}': `input.options.stack.spacing` must be [z, y, x] "
                    f"with `units` (got spacing={list(spacing)}, units={units!r})"
                )
            steps, unit = tuple(float(s) for s in spacing), units
        else:
            steps, unit = (1.0, *first.info.spacing), first.info.units
        channels = first.info.n_channels
        has_c = first.info.axes[0] == "c"
        digest = hashlib.sha256(self.path.encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        self.info = ItemInfo(
            id=item_id if item_id is not None else sanitize_id(os.path.basename(self.path)),
            path=self.path,
            format=first.info.format,
            shape=((channels,) if has_c else ()) + (len(self.files), *first.info.spatial_shape),
            dtype=first.info.dtype,
            axes=(("c",) if has_c else ()) + ("z", "y", "x"),
            spacing=steps,
            origin=(0.0, *first.info.origin),
            units=unit,
            fingerprint=digest.hexdigest()[:16],
            attrs={
                "stack_slices": len(self.files),
                "stack_first": names[0],
                "stack_last": names[-1],
            },
        )

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``region`` in ``z, y, x`` order; returns ``(c, *region_shape)``."""
        from segflow.io.discover import open_item

        zs, rows, cols = check_region(self.info, region)
        planes = []
        for k in range(zs.start, zs.stop):
            reader = self._slices.get(k)
            if reader is None:
                reader = self._slices[k] = open_item(self.files[k])
            planes.append(reader.read((rows, cols)))
        return np.stack(planes, axis=1)

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "files": self.files, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._slices = {}

    def __repr__(self) -> str:
        return f"StackReader({self.path!r}, item_id={self.info.id!r}, slices={len(self.files)})"
