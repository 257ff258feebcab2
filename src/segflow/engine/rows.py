"""Index rows held as Arrow columns, not as a dict per row.

A scheduled run over a large collection skips nearly every item: at a million items a dict
per skipped row (and per done row read from the index) is gigabytes of Python objects in
the planning task, the flow and its summary. :class:`IndexRows` holds such rows as one
``pyarrow.Table`` (a few hundred bytes per row, in shared buffers) and gives them back as
dicts only where a few are needed (the summary's first rows, a log line's first ids) or one
batch at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Schema metadata naming the columns kept as JSON text (values of mixed kinds: Arrow has no
# column type for them); :meth:`IndexRows.__iter__` decodes them back.
JSON_COLUMNS = b"segflow.json_columns"
# Rows turned into dicts at once when iterating (a batch's dicts are dropped before the next).
ITER_BATCH = 8192
_SCALARS = (str, bool, int, float)


def table_of_rows(rows: Sequence[Mapping[str, Any]]) -> Any:
    """``rows`` (dicts, missing keys as None) as a ``pyarrow.Table``, a column per key in
    the order keys first appear. A column whose values are not all of one plain kind (text,
    bool, int or float; None anywhere) is kept as JSON text, so each value comes back as it
    was (an ``int`` stays an ``int`` beside a ``float``).

    Examples
    --------
    >>> rows = [{"id": "a", "n": 1}, {"id": "b", "n": "x", "extra": 2.5}]
    >>> list(IndexRows(table_of_rows(rows))) == [{**rows[0], "extra": None}, rows[1]]
    True
    """
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    columns, encoded = {}, []
    for name in names:
        values = [_plain_value(row.get(name)) for row in rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) <= 1 and kinds <= set(_SCALARS):
            columns[name] = pa.array(values, type=None if kinds else pa.large_string())
        else:
            text = [None if v is None else json.dumps(v) for v in values]
            columns[name] = pa.array(text, type=pa.large_string())
            encoded.append(name)
    table = pa.table(columns) if columns else pa.table({"id": pa.array([], pa.large_string())})
    return table.replace_schema_metadata({JSON_COLUMNS: json.dumps(encoded)}) if encoded else table


def _plain_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class IndexRows:
    """Index rows as one ``pyarrow.Table`` (``table``): ``len`` is their count, iterating
    gives each row as a dict (built a batch at a time, never all at once), :meth:`ids`
    their ids as an Arrow array, :meth:`head` the first few as dicts.

    Examples
    --------
    >>> import pyarrow as pa
    >>> rows = IndexRows(pa.table({"id": ["b", "a"], "status": ["skipped", "skipped"]}))
    >>> len(rows), rows.ids().to_pylist(), rows.by_id().head(1)
    (2, ['b', 'a'], [{'id': 'a', 'status': 'skipped'}])
    """

    table: Any = field(default=None)

    def __post_init__(self) -> None:
        import pyarrow as pa

        if self.table is None:
            object.__setattr__(self, "table", pa.table({"id": pa.array([], pa.large_string())}))
        elif not isinstance(self.table, pa.Table):
            object.__setattr__(self, "table", table_of_rows(list(self.table)))

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        encoded = self._encoded()
        for batch in self.table.to_batches(max_chunksize=ITER_BATCH):
            for row in batch.to_pylist():
                for name in encoded:
                    if row[name] is not None:
                        row[name] = json.loads(row[name])
                yield row

    def _encoded(self) -> list[str]:
        metadata = self.table.schema.metadata or {}
        names: list[str] = json.loads(metadata.get(JSON_COLUMNS, b"[]"))
        return names

    def ids(self) -> Any:
        """The rows' ids, in order, as one Arrow array of text."""
        import pyarrow as pa

        column = self.table.column("id").combine_chunks()
        return column if pa.types.is_large_string(column.type) else column.cast(pa.large_string())

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` rows as dicts."""
        return list(IndexRows(self.table.slice(0, n)))

    def by_id(self) -> IndexRows:
        """The same rows in id order (byte order of the UTF-8 text: Python's order of str)."""
        import pyarrow.compute as pc

        order = pc.sort_indices(self.ids())
        return IndexRows(self.table.take(order))

    def column(self, name: str) -> Any:
        """Column ``name`` as one Arrow array (nulls where the rows do not have it)."""
        import pyarrow as pa

        if name not in self.table.column_names:
            return pa.nulls(len(self))
        return self.table.column(name).combine_chunks()


def first_by_id(
    rows: Sequence[Mapping[str, Any]], more: IndexRows, limit: int
) -> list[dict[str, Any]]:
    """The first ``limit`` rows, in id order, of ``rows`` (sorted by id) and ``more``
    (sorted by id) together: the head of ``sorted(rows + list(more))`` without making a
    dict of every row of ``more``. Ties keep ``rows`` first, as a stable sort does."""
    head = more.head(limit)
    merged: list[dict[str, Any]] = []
    i = j = 0
    while len(merged) < limit and (i < len(rows) or j < len(head)):
        if j >= len(head) or (i < len(rows) and str(rows[i]["id"]) <= str(head[j]["id"])):
            merged.append(dict(rows[i]))
            i += 1
        else:
            merged.append(head[j])
            j += 1
    return merged
