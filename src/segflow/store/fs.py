"""One way to reach a store's files: fsspec, with listings that are never stale."""

from __future__ import annotations

from typing import Any


def fresh_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and inner path of ``url``, its listing cache dropped.

    fsspec keeps one filesystem instance per process and protocol, and object-store ones
    (s3fs, gcsfs, adlfs) cache directory listings: a worker that listed a folder before
    other processes wrote into it would go on seeing it as it was (a complete item checked
    as missing its storage units, a record file not found). Every store check lists anew.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    fs.invalidate_cache(path)
    return fs, path
