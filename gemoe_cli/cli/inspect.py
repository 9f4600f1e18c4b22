"""`gemoe inspect MODEL`: the MoE structure of a model and whether gemoe supports it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def inspect_command(
    model: Annotated[str | None, typer.Argument(help="Hugging Face hub id or local model directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    list_families: Annotated[
        bool, typer.Option("--list-families", help="List the model types gemoe knows and exit.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code to run.")
    ] = False,
) -> None:
    """Show a model's MoE layers (family, E, K, scoring, bias, shared experts) and whether it is supported.

    Reads only config.json: the model is built on the meta device, so no weights are downloaded or loaded.
    Exits with 2 when the model is not supported.
    """
    from gemoe_cli.errors import InvalidInputError

    if list_families:
        _print_families(as_json)
        return
    if model is None:
        raise InvalidInputError("missing MODEL; pass a hub id or a local model directory.")

    from gemoe_cli.inspection import describe_source

    description = describe_source(model, trust_remote_code=trust_remote_code)
    if as_json:
        typer.echo(json.dumps(description.to_json(), indent=2))
    else:
        _print_description(description)
    if not description.supported:
        raise typer.Exit(code=2)


def _print_description(description) -> None:
    console = Console()
    verdict = "[green]supported[/green]" if description.supported else f"[red]not supported[/red]: {description.reason}"
    console.print(
        f"[bold]{description.source}[/bold]  model type {description.model_type}  family {description.family or '-'}"
    )
    console.print(f"{verdict}")
    if description.note:
        console.print(f"note: {description.note}")
    if not description.layers:
        return

    table = Table(title=f"{description.num_moe_layers} MoE layers")
    for column in ("path", "E", "K", "scoring", "selection bias", "shared experts"):
        table.add_column(column)
    for layer in description.layers:
        table.add_row(
            layer.path,
            str(layer.num_experts),
            str(layer.top_k),
            layer.scoring,
            "yes" if layer.selection_bias else "no",
            "yes" if layer.shared_experts else "no",
        )
    console.print(table)


def _print_families(as_json: bool) -> None:
    from gemoe_cli.routing.families import adapter_for, registered_model_types

    rows = []
    for model_type in registered_model_types():
        adapter = adapter_for(model_type)
        rows.append(
            {
                "model_type": model_type,
                "family": adapter.name,
                "supported": adapter.unsupported is None,
                "reason": adapter.unsupported or "",
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model types")
    for column in ("model type", "family", "supported"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model_type"], row["family"], "yes" if row["supported"] else f"no: {row['reason']}")
    Console().print(table)
