"""Export an adaptive MoE model to ONNX with its routers as ``ai.gemoe`` custom-domain nodes.

    from gemoe_cli.export import export_onnx
    export_onnx("out/olmoe-gemoe", Path("out/olmoe-onnx"))

Phases:

1. resolve the routing settings from a converted checkpoint's ``gemoe`` section or from a recipe;
2. load the model in float32;
3. trace it with the export-time routing path (`gemoe_cli.export.patching`) through
   ``torch.onnx.export(dynamo=True)`` at opset 18, attach the function bodies and run the ONNX checker;
4. save the tokenizer and ``gemoe_onnx.json``;
5. validate against PyTorch in onnxruntime.

The output directory appears only when every phase passed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemoe_cli import __version__
from gemoe_cli.atomic import atomic_directory, check_output_directory
from gemoe_cli.errors import GemoeError, InvalidInputError, RuntimeFailureError
from gemoe_cli.export import decoder, ops
from gemoe_cli.export.patching import BODIES, Body, RoutingSpec, check_exportable, export_routing
from gemoe_cli.export.torch_ops import translation_table
from gemoe_cli.export.validate import DEFAULT_ATOL, ValidationReport, validate_export

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "gemoe_onnx.json"
METADATA_FORMAT_VERSION = 1
_EXAMPLE_SHAPE = {"batch": 2, "sequence": 3, "past": 4}
"""Shape of the tracing example; each size is at least 2 so torch.export keeps the dimension dynamic."""


@dataclass
class ExportResult:
    """Files, metadata and validation report of one `export_onnx` run."""

    directory: Path
    metadata: dict
    validation: ValidationReport | None = None
    files: list[str] = field(default_factory=list)


# --- routing settings --------------------------------------------------------------------------------

def _text_thresholds(shared: dict[str, list[float]], by_modality: dict[str, dict[str, list[float]]], source: str):
    """Return per-layer thresholds for the text-only decoder: each layer's `text` thresholds where it has them.

    The exported graph takes token ids only, so every token it routes is a text token.
    """
    thresholds = dict(shared)
    for path, modalities in by_modality.items():
        if "text" in modalities:
            thresholds[path] = list(modalities["text"])
    logger.info("%s has per-modality thresholds; the text-only decoder routes with the text thresholds", source)
    return thresholds


def routing_from_checkpoint(source: str) -> RoutingSpec | None:
    """Return the routing of a converted checkpoint directory, or `None` when `source` is not one."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"cannot read {config_file}: {error}; pass a Hugging Face model directory.") from error
    section = config.get("gemoe")
    if section is None:
        return None
    thresholds = {path: [float(value) for value in values] for path, values in section["thresholds"].items()}
    by_modality = {
        path: {name: [float(value) for value in values] for name, values in modalities.items()}
        for path, modalities in (section.get("modality_thresholds") or {}).items()
    }
    if by_modality:
        thresholds = _text_thresholds(thresholds, by_modality, source)
    return RoutingSpec(
        k_min=int(section["k_min"]),
        k_max=None if section.get("k_max") is None else int(section["k_max"]),
        renormalize=section["renormalize"],
        thresholds=thresholds,
    )


def routing_from_recipe(recipe, source: str = "the recipe") -> RoutingSpec:
    """Return the routing settings of a validated `Recipe` (text thresholds from a per-modality one)."""
    thresholds = {path: list(layer.thresholds) for path, layer in recipe.layers.items()}
    if recipe.per_modality:
        by_modality = {path: dict(layer.modalities) for path, layer in recipe.layers.items() if layer.modalities}
        thresholds = _text_thresholds(thresholds, by_modality, source)
    return RoutingSpec(
        k_min=recipe.routing.k_min,
        k_max=recipe.resolved_k_max,
        renormalize=recipe.routing.renormalize,
        thresholds=thresholds,
    )


# --- the graph ---------------------------------------------------------------------------------------


def export_graph(
    model: torch.nn.Module,
    routing: RoutingSpec,
    path: Path,
    *,
    body: Body = "portable",
    activation_counts: bool = True,
) -> dict:
    """Trace `model` with adaptive routing into `path` and run the ONNX checker on it.

    Weights over 1.5 GiB (torch 2.13's threshold) go to ``<path>.data`` beside it.

    Returns the graph description written to ``gemoe_onnx.json``: inputs, outputs, cache layout and
    the custom ops with their overloads.

    Raises:
        UnsupportedModelError: the family or cache has no export path.
        RuntimeFailureError: tracing, conversion or the ONNX checker failed.
    """
    import onnx

    from gemoe_cli.routing import find_moe_blocks

    blocks = find_moe_blocks(model)
    check_exportable(blocks, body)
    layout = decoder.cache_layout(model)
    inputs = decoder.input_names(layout)
    outputs = decoder.output_names(layout, activation_counts)
    example = _example_arguments(model, layout)

    batch = torch.export.Dim(decoder.BATCH_DIM)
    sequence = torch.export.Dim(decoder.SEQUENCE_DIM)
    past = torch.export.Dim(decoder.PAST_DIM)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(layout.num_layers)],
    }

    with ops.registered_schemas(include_ort_moe=body == "ort"), export_routing(model, routing, body) as handle:
        wrapper = decoder.DecoderWithCache(model, handle.recorder if activation_counts else None).eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapper,
                    example,
                    dynamo=True,
                    opset_version=ops.ONNX_OPSET,
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_shapes=dynamic_shapes,
                    custom_translation_table=translation_table(),
                    optimize=True,
                    verbose=False,
                )
        except Exception as error:  # torch.export and the ONNX translation raise many exception types
            raise RuntimeFailureError(
                f"torch.onnx.export failed for {type(model).__name__}: {type(error).__name__}: "
                f"{_first_line(str(error))}; rerun with --verbose for the traceback."
            ) from error

    overloads = ops.attach_function_bodies(program.model)
    _name_total_sequence(program.model)
    program.save(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise RuntimeFailureError(f"the ONNX checker rejected {path}: {_first_line(str(error))}") from error

    # The exporter leaves out inputs the model does not read, so the saved graph's names are the truth.
    return {
        "inputs": [value.name for value in program.model.graph.inputs],
        "outputs": [value.name for value in program.model.graph.outputs],
        "dimensions": {
            decoder.BATCH_DIM: "batch size",
            decoder.SEQUENCE_DIM: "new tokens in this call",
            decoder.PAST_DIM: "tokens already in the KV cache",
            decoder.TOTAL_DIM: "past_sequence + sequence",
        },
        "kv_cache": layout.as_json(),
        "moe_layers": [block.path for block in blocks],
        "static_top_k": {block.path: block.top_k for block in blocks},
        "opset_imports": _opset_imports(body),
        "custom_ops": [
            {"domain": ops.DOMAIN, "op_type": ops.ROUTER_OP, "version": ops.DOMAIN_VERSION, "overloads": overloads}
        ],
    }


def _example_arguments(model, layout: decoder.CacheLayout) -> tuple:
    size = _EXAMPLE_SHAPE
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (size["batch"], size["sequence"]), generator=generator)
    past = [
        (torch.randn(size["batch"], kh, size["past"], kd), torch.randn(size["batch"], vh, size["past"], vd))
        for (kh, kd), (vh, vd) in zip(layout.keys, layout.values, strict=True)
    ]
    ids, mask, positions, past = decoder.step_inputs(ids, past)
    return ids, mask, positions, past


def _name_total_sequence(model) -> None:
    # torch.export names the derived mask length after a symbol (s53); give it a readable name.
    import onnx_ir as ir

    for value in model.graph.inputs:
        if value.name == decoder.ATTENTION_MASK and value.shape is not None:
            value.shape = ir.Shape([value.shape[0], decoder.TOTAL_DIM])


def _opset_imports(body: str) -> dict[str, int]:
    imports = {"": ops.ONNX_OPSET, ops.DOMAIN: ops.DOMAIN_VERSION}
    if body == "ort":
        imports[ops.MICROSOFT_DOMAIN] = 1
    return imports


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# --- the whole export ----------------------------------------------------------------------------------


def export_onnx(
    source: str,
    output: Path,
    *,
    recipe: Path | None = None,
    body: Body = "portable",
    validate: bool = True,
    atol: float = DEFAULT_ATOL,
    activation_counts: bool = True,
    force: bool = False,
    keep_failed: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    report: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `source` (a converted checkpoint, or a model with `recipe`) to an ONNX directory `output`.

    `report` receives one line per validated output. With `keep_failed`, a failed export's files are
    moved to ``<output>.failed`` (or ``<output>.failed-N`` when taken) instead of being deleted.

    Raises:
        InvalidInputError: a bad argument, output path, recipe or source.
        UnsupportedModelError: the model's family or cache cannot be exported.
        RuntimeFailureError: export, the checker or onnxruntime failed, or validation exceeded `atol`.
    """
    if body not in BODIES:
        raise InvalidInputError(f"--body {body} is unknown; use {' or '.join(BODIES)}.")
    if not (atol > 0 and math.isfinite(atol)):
        raise InvalidInputError(f"--atol {atol} is invalid; use a positive number such as 1e-4.")
    output = Path(output)
    inputs = {"model folder": Path(source)}
    if recipe is not None:
        inputs["recipe file"] = Path(recipe)
    check_output_directory(output, force=force, inputs=inputs)
    routing, loaded_recipe = _resolve_routing(source, recipe)
    report = report or logger.info

    with atomic_directory(output, force=force) as directory:
        try:
            result = _export_into(
                source,
                directory,
                routing,
                loaded_recipe,
                body=body,
                validate=validate,
                atol=atol,
                activation_counts=activation_counts,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                report=report,
            )
        except BaseException as error:
            if not keep_failed:
                raise
            failed_directory = _keep_failed_directory(directory, output)
            if isinstance(error, GemoeError):
                raise type(error)(f"{error} The failed export's files are kept in {failed_directory}.") from error
            logger.warning("the failed export's files are kept in %s", failed_directory)
            raise
    result.directory = output
    return result


def _resolve_routing(source: str, recipe: Path | None):
    if recipe is not None:
        from gemoe_cli.recipe import load_recipe

        loaded = load_recipe(recipe)
        return routing_from_recipe(loaded, str(recipe)), loaded
    routing = routing_from_checkpoint(source)
    if routing is None:
        raise InvalidInputError(
            f"{source} is not a converted checkpoint (no 'gemoe' section in config.json); pass --recipe, "
            "or export a directory written by gemoe convert."
        )
    return routing, None


def _keep_failed_directory(directory: Path, output: Path) -> Path:
    candidate = output.with_name(f"{output.name}.failed")
    number = 2
    while candidate.exists():
        candidate = output.with_name(f"{output.name}.failed-{number}")
        number += 1
    os.replace(directory, candidate)
    return candidate


def _export_into(
    source: str,
    directory: Path,
    routing: RoutingSpec,
    recipe,
    *,
    body: Body,
    validate: bool,
    atol: float,
    activation_counts: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    report: Callable[[str], None],
) -> ExportResult:
    from gemoe_cli.models import load_model

    model = load_model(source, dtype="float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if recipe is not None:
        from gemoe_cli.api import apply_recipe

        # Attaching checks the recipe against the model (family, layers, E, K, router fingerprint).
        apply_recipe(model, recipe).remove()

    graph = export_graph(model, routing, directory / MODEL_FILE, body=body, activation_counts=activation_counts)
    tokenizer_saved = _save_tokenizer(source, directory, trust_remote_code)
    metadata = _metadata(source, model, routing, body, graph, tokenizer_saved)
    _write_metadata(directory, metadata)

    validation = None
    if validate:
        validation = validate_export(directory / MODEL_FILE, model, routing, atol=atol)
        for line in validation.lines():
            report(line)
        metadata["validation"] = validation.as_json()
        _write_metadata(directory, metadata)
        validation.raise_for_failures()
    files = sorted(path.name for path in directory.iterdir())
    return ExportResult(directory, metadata, validation, files)


def _save_tokenizer(source: str, directory: Path, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    from gemoe_cli.models import has_tokenizer_files

    if not has_tokenizer_files(source):
        logger.warning("no tokenizer saved with the ONNX model: %s has no tokenizer files", source)
        return False
    # An OSError from loading means the source has no tokenizer. From saving it means the output is broken
    # (a full disk), so it is not caught there and the export stops.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("no tokenizer saved with the ONNX model: %s", _first_line(str(error)) or type(error).__name__)
        return False
    try:
        tokenizer.save_pretrained(directory)
    except (ValueError, TypeError, KeyError) as error:
        logger.warning("no tokenizer saved with the ONNX model: %s", _first_line(str(error)) or type(error).__name__)
        return False
    return True


def _metadata(source: str, model, routing: RoutingSpec, body: str, graph: dict, tokenizer_saved: bool) -> dict:
    import onnx
    import onnxruntime

    text_config = model.config.get_text_config()
    return {
        "format_version": METADATA_FORMAT_VERSION,
        "tool": f"gemoe {__version__}",
        "source": str(source),
        "model_type": model.config.model_type,
        "model_file": MODEL_FILE,
        "dtype": "float32",
        "body": body,
        "vocab_size": text_config.vocab_size,
        "eos_token_id": _eos_token_id(model),
        "tokenizer": tokenizer_saved,
        "routing": routing.as_json(),
        **graph,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "validation": None,
    }


def _eos_token_id(model) -> int | list[int] | None:
    generation_config = getattr(model, "generation_config", None)
    return getattr(generation_config, "eos_token_id", None)


def _write_metadata(directory: Path, metadata: dict) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", "utf-8")


def read_metadata(directory: Path) -> dict:
    """Return the ``gemoe_onnx.json`` of an export directory."""
    path = Path(directory) / METADATA_FILE
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"cannot read {path}: {error}; pass a directory written by gemoe export onnx."
        ) from error
