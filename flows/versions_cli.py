"""``segflow history``, ``segflow tag`` and ``segflow prune``: a store's versions from the
command line (:mod:`segflow.store.versions`)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

import typer

EXIT_INVALID = 2  # as the other commands: nothing was written

StoreArgument = Annotated[str, typer.Argument(help="A segflow output store (folder or URL).")]


def _open(store: str) -> None:
    """Refuse a path that is not a segflow store, or one a newer segflow wrote, in one line
    (before anything is written)."""
    from segflow.store.commit import StoreFormatError, check_store_format, is_segflow_store

    if not is_segflow_store(store):
        typer.echo(
            f"'{store}' is not a segflow store (no segflow marker in its zarr.json)", err=True
        )
        raise typer.Exit(EXIT_INVALID)
    try:
        check_store_format(store)
    except StoreFormatError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(EXIT_INVALID) from None


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    return str(value) if value else "-"


def history(
    store: StoreArgument,
    item: Annotated[
        str | None, typer.Argument(help="An item: list its versions instead of the runs.")
    ] = None,
) -> None:
    """List the runs that committed to a store (oldest first): flow run id and name, config
    hash, code version, when and how many items; with ITEM, that item's versions."""
    from segflow.store.versions import read_history, read_tags

    _open(store)
    rows = read_history(store, item)
    if item is not None:
        for row in rows:
            mark = "  (latest)" if row["latest"] else ""
            typer.echo(
                f"{row['version']}  run {row.get('run_id')} {row.get('run_name') or ''}  "
                f"config {row.get('config_hash') or '-'}  code {row.get('code_version') or '-'}"
                f"  {row.get('object_count')} objects{mark}"
            )
        return
    tags = read_tags(store)
    for row in rows:
        typer.echo(
            f"{_when(row['last'])}  run {row.get('run_id')} ({row.get('run_name') or '-'})  "
            f"{row['items']} item(s)  config {row.get('config_hash') or '-'}  "
            f"code {row.get('code_version') or '-'}"
        )
    for name, key in sorted(tags.items(), key=lambda kv: kv[1]):
        typer.echo(f"tag {name}: {key}")


def tag(
    store: StoreArgument,
    name: Annotated[str, typer.Argument(help="The tag's name.")],
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", metavar="WHEN", help="Tag this run, tag or time, not now."),
    ] = None,
) -> None:
    """Name the store's state now (or --as-of) so `--as-of NAME` reads it and prune keeps
    its versions."""
    from segflow.store.versions import tag_store

    _open(store)
    try:
        key = tag_store(store, name, as_of=as_of)
    except ValueError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(f"tag {name}: {key}")


def prune(
    store: StoreArgument,
    keep_last: Annotated[
        int | None, typer.Option(min=1, help="Versions each item keeps at least.")
    ] = None,
    keep_days: Annotated[
        float | None, typer.Option(min=0.0, help="Versions younger than this are kept.")
    ] = None,
    keep_tags: Annotated[
        bool | None, typer.Option("--keep-tags/--no-keep-tags", help="Keep tagged versions.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go.")] = False,
) -> None:
    """Remove old item versions the retention policy lets go (the store's `output.retention`
    as its last run recorded it, or the options). An item's latest version always stays."""
    from segflow.store.lock import StoreLockedError, hold_store_lock, is_local
    from segflow.store.pointers import recover_publishes
    from segflow.store.versions import plan_prune, prune_versions, read_retention, recover_links

    _open(store)
    policy = read_retention(store, keep_last=keep_last, keep_days=keep_days, keep_tags=keep_tags)
    try:
        with hold_store_lock(store, run_id=f"prune-{uuid.uuid4().hex[:8]}"):
            if is_local(store):
                recover_links(store)  # a killed commit's link first: its version is latest
            else:
                recover_publishes(store)  # a killed commit's copy: finished or removed
            plan = plan_prune(store, policy)
            for item_id, version in plan:
                typer.echo(f"{'would remove' if dry_run else 'remove'} {item_id} {version}")
            removed = 0 if dry_run else prune_versions(store, plan)
    except StoreLockedError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(
        f"{store}: {len(plan) if dry_run else removed} old version(s) "
        f"{'to remove' if dry_run else 'removed'} (keep_last {policy.keep_last}, "
        f"keep_days {policy.keep_days:g}, keep_tags {str(policy.keep_tags).lower()})"
    )
