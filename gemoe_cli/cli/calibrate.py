"""`gemoe calibrate MODEL`: fit per-layer entropy thresholds to a sparsity or retention budget."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from gemoe_cli.calibration.images import DEFAULT_PROMPT_TEMPLATE
from gemoe_cli.cli.options import (
    AllowPickleOption,
    DatasetOption,
    DtypeOption,
    MaxImagesOption,
    PromptTemplateOption,
    TrustRemoteCodeOption,
    check_distinct_outputs,
    check_dtype,
    check_output_file,
)
from gemoe_cli.errors import InvalidInputError

DEFAULT_NUM_SAMPLES = 256
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8
DEFAULT_HELDOUT_FRACTION = 0.2


def _check_budget(name: str, value: float | None, example: str) -> None:
    if value is not None and not 0.0 < value < 1.0:  # also rejects NaN
        raise InvalidInputError(f"{name} {value} is outside (0, 1); pass a fraction such as {example}.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_fraction(value: object) -> bool:
    return _is_number(value) and 0.0 < value < 1.0


# Each preset setting maps to a check of its value and to the expected value that an error message names.
PRESET_SETTINGS: dict[str, tuple[Callable[[object], bool], str]] = {
    "target_sparsity": (_is_fraction, "a number between 0 and 1, such as 0.35"),
    "min_retention": (_is_fraction, "a number between 0 and 1, such as 0.99"),
    "metric": (lambda value: value in ("nll", "agreement", "kl", "exact_match"), "nll, agreement, kl or exact_match"),
    "dataset": (lambda value: isinstance(value, str) and value != "", "a dataset name or path, such as builtin"),
    "num_samples": (lambda value: _is_integer(value) and value >= 2, "an integer of 2 or more, such as 256"),
    "seq_len": (lambda value: _is_integer(value) and value >= 2, "an integer of 2 or more, such as 256"),
    "batch_size": (lambda value: _is_integer(value) and value >= 1, "an integer of 1 or more, such as 8"),
    "seed": (_is_integer, "an integer, such as 0"),
    "heldout_fraction": (_is_fraction, "a number between 0 and 1, such as 0.2"),
    "k_min": (lambda value: _is_integer(value) and value >= 1, "an integer of 1 or more, such as 1"),
    "k_max": (lambda value: value is None or (_is_integer(value) and value >= 1), "an integer of 1 or more, or null"),
    "renormalize": (lambda value: value in ("preserve_mass", "none"), "preserve_mass or none"),
    "policy": (lambda value: value in ("allocated", "uniform"), "allocated or uniform"),
    "per_modality": (lambda value: isinstance(value, bool), "true or false"),
}
PRESET_KEYS = tuple(PRESET_SETTINGS)


def _check_preset_values(path: Path, settings: dict) -> None:
    """Raise `InvalidInputError` for the first preset setting whose type or range is invalid."""
    for key, value in settings.items():
        is_valid, expected = PRESET_SETTINGS[key]
        if not is_valid(value):
            value_text = "null" if value is None else f"{value!r} ({type(value).__name__})"
            raise InvalidInputError(f"--recipe {path}: calibrate.{key} is {value_text}; set it to {expected}.")


def _preset_options(path: Path, context: typer.Context) -> dict:
    """Read the `calibrate:` settings of a preset in recipes/, keeping only options not given on the command line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InvalidInputError(f"cannot read --recipe {path}: {error}; pass a preset from recipes/.") from error
    settings = data.get("calibrate") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise InvalidInputError(f"--recipe {path} has no 'calibrate:' mapping; pass a preset from recipes/.")
    unknown = sorted(set(settings) - set(PRESET_KEYS))
    if unknown:
        raise InvalidInputError(f"--recipe {path} has unknown setting {unknown[0]!r}; use {', '.join(PRESET_KEYS)}.")
    _check_preset_values(path, settings)
    return {
        key: value
        for key, value in settings.items()
        if getattr(context.get_parameter_source(key), "name", "DEFAULT") == "DEFAULT"
    }


def calibrate_command(
    context: typer.Context,
    model: Annotated[str, typer.Argument(help="Hugging Face hub id or local model directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Recipe file to write (.yaml or .json).")] = Path(
        "recipe.yaml"
    ),
    report: Annotated[Path | None, typer.Option("--report", help="Also write a JSON report to this file.")] = None,
    target_sparsity: Annotated[
        float | None, typer.Option("--target-sparsity", help="Fraction of expert activations to remove, in (0, 1).")
    ] = None,
    min_retention: Annotated[
        float | None, typer.Option("--min-retention", help="Lowest acceptable held-out retention, in (0, 1).")
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric", help="Retention metric: nll, agreement or kl; exact_match (greedy answers) for image+text data."
        ),
    ] = "nll",
    dataset: DatasetOption = None,
    prompt_template: PromptTemplateOption = DEFAULT_PROMPT_TEMPLATE,
    max_images: MaxImagesOption = None,
    per_modality: Annotated[
        bool,
        typer.Option(
            "--per-modality",
            help="Fit separate thresholds for image and text tokens (vision-language models, image+text data).",
        ),
    ] = False,
    skip_bad_samples: Annotated[
        bool,
        typer.Option(
            "--skip-bad-samples",
            help="Leave out samples that cannot be used (missing image, too many images, ...) and count them, "
            "instead of stopping at the first.",
        ),
    ] = False,
    num_samples: Annotated[
        int, typer.Option("--num-samples", help="Token blocks, or image+text samples, to use (fit + held-out).")
    ] = DEFAULT_NUM_SAMPLES,
    seq_len: Annotated[
        int, typer.Option("--seq-len", help="Tokens per block (text data; image+text samples keep their length).")
    ] = DEFAULT_SEQ_LEN,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Blocks per forward pass (image+text samples run one at a time).")
    ] = DEFAULT_BATCH_SIZE,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sample order and the fit/held-out split.")] = 0,
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of blocks kept out of fitting to measure retention.")
    ] = DEFAULT_HELDOUT_FRACTION,
    k_min: Annotated[int, typer.Option("--k-min", help="Fewest experts a token may engage.")] = 1,
    k_max: Annotated[int | None, typer.Option("--k-max", help="Most experts a token may engage (default K).")] = None,
    renormalize: Annotated[
        str, typer.Option("--renormalize", help="preserve_mass (rescale kept weights) or none.")
    ] = "preserve_mass",
    policy: Annotated[
        str, typer.Option("--policy", help="allocated (cost-aware layer allocation) or uniform (same quantiles).")
    ] = "allocated",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
    preset: Annotated[
        Path | None,
        typer.Option("--recipe", help="Calibration settings from recipes/; options given here override them."),
    ] = None,
) -> None:
    """Fit per-layer gating-entropy thresholds on calibration data and write a recipe.

    Give --target-sparsity, --min-retention or both. Sparsity and retention in the recipe are measured on a
    held-out part of the data by running the adaptive model. Vision-language models calibrate on image+text
    samples through their own processor and chat template; --per-modality gives image and text tokens
    thresholds of their own.
    """
    if preset is not None:
        settings = _preset_options(preset, context)
        target_sparsity = settings.get("target_sparsity", target_sparsity)
        min_retention = settings.get("min_retention", min_retention)
        metric = settings.get("metric", metric)
        dataset = settings.get("dataset", dataset)
        num_samples = settings.get("num_samples", num_samples)
        seq_len = settings.get("seq_len", seq_len)
        batch_size = settings.get("batch_size", batch_size)
        seed = settings.get("seed", seed)
        heldout_fraction = settings.get("heldout_fraction", heldout_fraction)
        k_min = settings.get("k_min", k_min)
        k_max = settings.get("k_max", k_max)
        renormalize = settings.get("renormalize", renormalize)
        policy = settings.get("policy", policy)
        per_modality = settings.get("per_modality", per_modality)
    _check_budget("--target-sparsity", target_sparsity, "0.35")
    _check_budget("--min-retention", min_retention, "0.99")
    if target_sparsity is None and min_retention is None:
        raise InvalidInputError("no budget given; pass --target-sparsity, --min-retention or both.")
    if metric not in ("nll", "agreement", "kl", "exact_match"):
        raise InvalidInputError(f"--metric {metric} is unknown; use nll, agreement, kl or exact_match.")
    if max_images is not None and max_images < 1:
        raise InvalidInputError(f"--max-images {max_images} is invalid; use 1 or more.")
    if renormalize not in ("preserve_mass", "none"):
        raise InvalidInputError(f"--renormalize {renormalize} is unknown; use preserve_mass or none.")
    if policy not in ("allocated", "uniform"):
        raise InvalidInputError(f"--policy {policy} is unknown; use allocated or uniform.")
    if not 0.0 < heldout_fraction < 1.0:
        raise InvalidInputError(f"--heldout-fraction {heldout_fraction} is outside (0, 1); use e.g. 0.2.")
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size {batch_size} is invalid; use 1 or more.")
    check_dtype(dtype)
    if output.suffix not in (".yaml", ".yml", ".json"):
        raise InvalidInputError(f"-o {output} has suffix {output.suffix!r}; use .yaml, .yml or .json.")
    check_distinct_outputs(("-o", output), ("--report", report))
    check_output_file(output, "-o")
    if report is not None:
        check_output_file(report, "--report")

    from gemoe_cli.calibration.pipeline import run_calibration

    started = time.perf_counter()
    outcome = run_calibration(
        model,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        heldout_fraction=heldout_fraction,
        target_sparsity=target_sparsity,
        min_retention=min_retention,
        metric=metric,
        k_min=k_min,
        k_max=k_max,
        renormalize=renormalize,
        policy=policy,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        per_modality=per_modality,
        prompt_template=prompt_template,
        max_images=max_images,
        skip_bad_samples=skip_bad_samples,
    )

    from gemoe_cli.atomic import OutputFile, write_files_atomically
    from gemoe_cli.recipe import recipe_text

    outcome.report["seconds"]["total"] = time.perf_counter() - started
    # The recipe and the report are replaced together, so a failed write leaves the previous pair.
    outputs = [OutputFile(output, recipe_text(outcome.recipe, output), "recipe file")]
    if report is not None:
        outputs.append(OutputFile(report, json.dumps(outcome.report, indent=2) + "\n", "report"))
    write_files_atomically(outputs)
    outcome.print_summary(output, report)
