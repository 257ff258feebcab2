"""What segflow can do, from the command line: ``segflow ops`` (the pipeline operations),
``segflow models inspect`` / ``models sources`` (the model formats it reads and the card it
derives from a model) and ``segflow formats`` (the input formats). Registered on the one
``app`` by :mod:`segflow.flows.cli`; nothing here imports Prefect or the engine until a
command runs."""

from __future__ import annotations

import shutil
from typing import Annotated, Any

import typer

from segflow.flows.cli_options import EXIT_INVALID


def ops(
    name: Annotated[
        str | None,
        typer.Argument(
            help="One operation: its parameters, defaults and halo rule.", show_default=False
        ),
    ] = None,
) -> None:
    """List the pipeline operations, one line each; with NAME, one operation in full."""
    from segflow.ops import get_operation, list_operations

    if name is None:
        width = max(shutil.get_terminal_size().columns, 60)
        column = max(len(op.name) for op in list_operations()) + 2
        typer.echo("segflow operations (pipeline steps: {op: NAME, PARAM: VALUE}):")
        for op in list_operations():
            typer.echo(f"  {op.name:<{column}}{_one_line(op.summary, width - column - 2)}")
        typer.echo("segflow ops NAME: its parameters, defaults and halo rule")
        return
    try:
        op = get_operation(name, public=True)
    except KeyError as error:
        typer.echo(f"segflow ops: {error.args[0]}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    _print_operation(op)


models_app = typer.Typer(
    help="Models segflow runs: the formats it reads and the card it derives from each.",
    no_args_is_help=True,
)


@models_app.command("inspect")
def models_inspect(
    path: Annotated[str, typer.Argument(help="A model file or folder.", show_default=False)],
) -> None:
    """Print the card segflow derives from a model: its source, input channels and axes,
    normalisation, tile and overlap, spacing and output classes."""
    from segflow.errors import ModelError
    from segflow.models.sources import card_lines, describe_model

    try:
        described = describe_model(path)
    except ModelError as error:
        typer.echo(f"segflow models inspect: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    for line in card_lines(path, described):
        typer.echo(line)


@models_app.command("sources")
def models_sources() -> None:
    """List the model formats segflow reads, in the order they are tried."""
    from segflow.models.sources import sources

    typer.echo("segflow model sources (tried in this order):")
    for source in sources():
        typer.echo(f"  {source.name:<14}{source.description}")


def formats() -> None:
    """List the input formats segflow reads: what makes an item, and what metadata is kept."""
    from segflow.io import describe_formats

    typer.echo("segflow input formats (tried in this order; `input.options` per reader):")
    for row in describe_formats():
        typer.echo(f"  {row['name']:<10}{row['description']}")
        typer.echo(f"  {'':<10}item: {row['item']}, names: {row['suffixes']}")
        typer.echo(f"  {'':<10}keeps: {row['metadata']}")
        if row["options"]:
            typer.echo(f"  {'':<10}options: {row['options']}")


def _one_line(summary: str, width: int) -> str:
    """The head of an operation's summary that fits ``width``: its first clause, without a
    parenthesised aside, cut at a word with "..." if still too long."""
    line = summary.split("; ")[0]
    aside = line.find(" (")
    if len(line) > width and aside >= 20:
        line = line[:aside]
    if len(line) > width:
        line = line[: width - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."
    return line


def _type_name(model: Any, name: str, described: str) -> str:
    """``Literal`` parameters read as their choices: ``'disk' | 'square'``."""
    import typing

    annotation = model.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    return described


def _print_operation(op: Any) -> None:
    from segflow.ops import describe_params

    typer.echo(f"{op.name} ({op.kind}): {op.summary}")
    typer.echo(f"halo: {op.halo_rule}")
    rows = describe_params(op)
    typer.echo("parameters:" if rows else "parameters: none")
    for param, kind, default in rows:
        field = op.params.model_fields[param]
        head = f"  {param}: {_type_name(op.params, param, kind)}"
        head += " (required)" if default == "required" else f" = {default}"
        typer.echo(head + (f"  - {field.description}" if field.description else ""))
