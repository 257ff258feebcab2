"""Per-block completion records of an item's output phase, for resuming inside an item.

A 100,000^2 mosaic takes hours; a crash near its end must not redo every block. Each
block of the output phase, once its arrays and region rows are written, records its
summary in ``STAGE/.blocks/KEY/NNNNNNNN.pkl`` (written to a temporary name and renamed, so
a record is whole or absent). A rerun of the same item, input, config and code finds the
stage again, recomputes the earlier phases (statistics, label merges: deterministic, and
cheap next to the output phase's writes) and maps only the blocks without a record.
``KEY`` digests what the output depends on (the output dtype, every statistic, the object
count), so records of a run that computed anything differently are never reused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid
from collections.abc import Mapping
from typing import Any

from segflow.store.fs import fresh_fs


class BlockRecords:
    """Completion records of one staged item; picklable (a path and a key).

    Parameters
    ----------
    folder : str
        ``STAGE/.blocks`` (a local path or URL).
    key : str
        What the output depends on; see :func:`output_key`.

    Examples
    --------
    >>> import tempfile
    >>> records = BlockRecords(tempfile.mkdtemp(), "k1")
    >>> records.write(3, {"foreground": 7})
    >>> records.load()
    {3: {'foreground': 7}}
    >>> BlockRecords(records.folder, "k2").load()
    {}
    """

    def __init__(self, folder: str, key: str) -> None:
        self.folder = str(folder).rstrip("/")
        self.key = key

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.key}"

    def write(self, linear: int, summary: Any) -> None:
        """Record that block ``linear`` is written (its ``summary`` for the merge)."""

        data = pickle.dumps(summary, protocol=pickle.HIGHEST_PROTOCOL)
        fs, path = fresh_fs(f"{self.path}/{linear:08d}.pkl")
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)

    def load(self) -> dict[int, Any]:
        """Every recorded block's summary, by linear index (none when the key changed)."""

        fs, path = fresh_fs(self.path)
        if not fs.exists(path):
            return {}
        found = {}
        for name in fs.ls(path, detail=False):
            base = os.path.basename(str(name))
            if not base.endswith(".pkl"):
                continue
            with fs.open(name, "rb") as handle:
                found[int(base[:-4])] = pickle.loads(handle.read())
        return found

    def __repr__(self) -> str:
        return f"BlockRecords({self.folder!r}, {self.key!r})"


def output_key(*parts: Any, stats: Mapping[str, Any]) -> str:
    """A digest of what an output phase's blocks depend on."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    for name in sorted(stats):
        digest.update(name.encode())
        digest.update(pickle.dumps(stats[name], protocol=4))
    return digest.hexdigest()[:16]
