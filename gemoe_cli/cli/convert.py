"""`gemoe convert MODEL --recipe R -o DIR`: save a checkpoint that loads back with adaptive routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemoe_cli.cli.options import (
    AllowPickleOption,
    DtypeOption,
    IgnoreFingerprintOption,
    TrustRemoteCodeOption,
    check_dtype,
)


def convert_command(
    model: Annotated[str, typer.Argument(help="Hugging Face hub id or local model directory.")],
    recipe: Annotated[Path, typer.Option("--recipe", help="Recipe file from `gemoe calibrate` (.yaml or .json).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write; must not exist.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    dtype: DtypeOption = "auto",
    device_map: Annotated[
        str | None, typer.Option("--device-map", help="Passed to from_pretrained, e.g. auto or cpu.")
    ] = None,
    ignore_fingerprint: IgnoreFingerprintOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Rewrite the routers with a recipe and save a Hugging Face checkpoint directory.

    The directory appears only when complete. It loads with `gemoe_cli.convert.load_adaptive_model`, or with
    transformers alone through `trust_remote_code=True`.
    """
    from gemoe_cli.atomic import check_output_directory
    from gemoe_cli.recipe import load_recipe

    loaded = load_recipe(recipe)
    check_output_directory(output, force=force, inputs={"model folder": Path(model)})
    check_dtype(dtype)

    from rich.console import Console

    from gemoe_cli.convert import convert

    written = convert(
        model,
        loaded,
        output,
        dtype=dtype,
        device_map=device_map,
        force=force,
        ignore_fingerprint=ignore_fingerprint,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    Console(stderr=True).print(f"adaptive checkpoint written to {written}")
