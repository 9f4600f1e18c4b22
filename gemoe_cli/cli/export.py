"""`gemoe export onnx SRC -o DIR`: write an ONNX model with GeMoE router ops, validated in onnxruntime."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gemoe_cli.cli.options import AllowPickleOption, TrustRemoteCodeOption
from gemoe_cli.export.validate import DEFAULT_ATOL


class ExportFormat(str, Enum):
    onnx = "onnx"


class BodyChoice(str, Enum):
    portable = "portable"
    ort = "ort"


def export_command(
    export_format: Annotated[ExportFormat, typer.Argument(metavar="FORMAT", help="Export format: onnx.")],
    source: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Directory written by `gemoe convert`, or any supported model (local directory or hub id) "
            "together with --recipe.",
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write; must not exist unless --force.")],
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Recipe (.yaml or .json) that sets the routing; needed unless SRC is converted."),
    ] = None,
    body: Annotated[
        BodyChoice,
        typer.Option(
            "--body",
            help="How the experts are computed: portable uses standard ONNX ops (opset 18) and model-local "
            "functions; ort uses onnxruntime's com.microsoft::MoE op and runs only in onnxruntime.",
        ),
    ] = BodyChoice.portable,
    validate: Annotated[
        bool,
        typer.Option("--validate/--no-validate", help="Compare onnxruntime with PyTorch on several shapes."),
    ] = True,
    atol: Annotated[
        float, typer.Option("--atol", help="Largest allowed absolute difference of any output in validation.")
    ] = DEFAULT_ATOL,
    activation_counts: Annotated[
        bool,
        typer.Option(
            "--activation-counts/--no-activation-counts",
            help="Add the output expert_activations: active (token, expert) pairs per MoE layer.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    keep_failed: Annotated[
        bool, typer.Option("--keep-failed", help="Keep a failed export's files in DIR.failed for inspection.")
    ] = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Export an adaptive MoE model to ONNX, with each router as an ai.gemoe::EntropyAdaptiveRouter node.

    DIR receives model.onnx (plus model.onnx.data for weights over 1.5 GiB), the tokenizer files and
    gemoe_onnx.json, and appears only when the export and its validation passed. A validation difference over --atol
    exits with code 3.
    """
    from rich.console import Console

    from gemoe_cli.export.onnx_export import export_onnx

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    result = export_onnx(
        source,
        output,
        recipe=recipe,
        body=body.value,
        validate=validate,
        atol=atol,
        activation_counts=activation_counts,
        force=force,
        keep_failed=keep_failed,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        report=console.print,
    )
    overloads = ", ".join(result.metadata["custom_ops"][0]["overloads"])
    console.print(f"ONNX export ({export_format.value}, {body.value} body) written to {result.directory}")
    console.print(f"custom op ai.gemoe::EntropyAdaptiveRouter, overloads: {overloads}")
