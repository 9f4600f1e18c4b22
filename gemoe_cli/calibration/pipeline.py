"""The whole `gemoe calibrate` run as one function: validate, load, calibrate, build recipe and report.

Vision-language models calibrate on image+text samples (the built-in image set unless `dataset` names
another); text-only models on token blocks. Both kinds of data are read, checked and encoded before the
model loads, so a bad sample stops the run before any weight is read and nothing is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemoe_cli.calibration.bad_samples import BadSamples
from gemoe_cli.calibration.calibrate import CalibrationResult, calibrate
from gemoe_cli.calibration.data import BUILTIN, CalibrationData, build_calibration_data
from gemoe_cli.calibration.images import BUILTIN_IMAGES, DEFAULT_PROMPT_TEMPLATE, is_image_text_dataset
from gemoe_cli.calibration.multimodal import MultimodalCalibrationData
from gemoe_cli.calibration.report import CalibrationSettings, build_recipe, build_report
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.recipe import Recipe, RoutingSettings

logger = logging.getLogger(__name__)


@dataclass
class CalibrationOutcome:
    """The recipe and report of a finished calibration, ready to write."""

    recipe: Recipe
    report: dict
    result: CalibrationResult
    metric: str

    def print_summary(self, recipe_path: Path, report_path: Path | None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True)
        table = Table(title="gemoe calibration (held-out, adaptive model)")
        for column in ("layer", "thresholds", "sparsity", "k histogram"):
            table.add_column(column)
        for path, layer in self.report["layers"].items():
            rows = [(path, layer)]
            if self.recipe.per_modality:
                # Per-modality recipes route every measured token with its modality's thresholds.
                rows = [(f"{path} [{name}]", entry) for name, entry in layer.get("modalities", {}).items()]
            for name, entry in rows:
                thresholds = ", ".join(f"{value:.3f}" for value in entry["thresholds"])
                sparsity = entry["heldout_sparsity"]
                table.add_row(
                    name, thresholds, "-" if sparsity is None else f"{sparsity:.3f}", str(entry["heldout_k_histogram"])
                )
        console.print(table)
        heldout = self.result.heldout
        console.print(
            f"sparsity {heldout.sparsity:.4f} (fit part {self.result.fit_sparsity:.4f}), "
            f"{self.metric} retention {heldout.retention(self.metric):.4f} on {heldout.tokens} held-out tokens"
        )
        if heldout.modality_sparsity:
            by_modality = ", ".join(f"{name} {value:.4f}" for name, value in heldout.modality_sparsity.items())
            console.print(f"held-out sparsity by modality: {by_modality}")
        if heldout.exact_match is not None:
            console.print(f"greedy answers identical to static routing: {heldout.exact_match:.4f} of samples")
        skipped = self.report["data"].get("bad_samples") or {}
        if skipped.get("skipped"):
            console.print(f"skipped {skipped['skipped']} bad samples: {skipped['by_kind']}")
        console.print(f"recipe written to {recipe_path}" + (f", report to {report_path}" if report_path else ""))


def _progress_bar(data: CalibrationData | MultimodalCalibrationData):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # The bar goes to stderr, and only on a terminal: elsewhere rich would leave an empty line behind.
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[samples_per_second]:.1f} samples/s, {task.fields[tokens_per_second]:.0f} tokens/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )


@dataclass(frozen=True)
class DatasetChoice:
    """The data source of a run and whether it contains image+text samples."""

    dataset: str
    image_text: bool
    vision_language: bool
    """Whether the model has a vision tower."""
    hub_rows: Any = None
    """The rows of an ``hf:`` dataset already loaded to look at its columns (vision-language models only)."""


def choose_dataset(config, dataset: str | None) -> DatasetChoice:
    """Pick the data source and tell whether it contains image+text samples, without opening any image.

    `dataset=None` picks the built-in image set for vision-language models and the built-in text set
    otherwise. Image+text data is used only for a vision-language model.
    """
    from gemoe_cli.calibration.data import load_hub_dataset
    from gemoe_cli.vlm import family_of

    vision_language = family_of(config) is not None
    dataset = dataset or (BUILTIN_IMAGES if vision_language else BUILTIN)
    if vision_language and dataset.startswith("hf:"):
        rows = load_hub_dataset(dataset)
        image_text = any(column in rows.column_names for column in ("image", "images"))
        return DatasetChoice(dataset, image_text, vision_language, rows)
    return DatasetChoice(dataset, vision_language and is_image_text_dataset(dataset), vision_language)


def read_data(
    source: str,
    config,
    choice: DatasetChoice,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    heldout_fraction: float,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_images: int | None = None,
    skip_bad_samples: bool = False,
    trust_remote_code: bool = False,
) -> CalibrationData | MultimodalCalibrationData:
    """Read, encode and split the data of `choice` for the model at `source`, as `gemoe calibrate` does.

    Image+text samples go through the model's processor and chat template, text through its tokenizer.
    No weights load.

    Raises:
        InvalidInputError: the tokenizer or processor is missing, the data is missing or too small, or a
            sample is bad and `skip_bad_samples` is off.
    """
    from gemoe_cli.calibration.images import read_image_text_samples, samples_from_rows
    from gemoe_cli.calibration.multimodal import build_multimodal_data
    from gemoe_cli.models import load_tokenizer, max_positions
    from gemoe_cli.routing.modality import placeholder_token_ids
    from gemoe_cli.vlm import load_processor

    bad_samples = BadSamples(skip=skip_bad_samples)
    if not choice.image_text:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        return build_calibration_data(
            choice.dataset,
            tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            heldout_fraction=heldout_fraction,
            max_positions=max_positions(config),
            bad_samples=bad_samples,
        )

    processor = load_processor(source, config, trust_remote_code=trust_remote_code)
    if choice.hub_rows is not None:
        samples = samples_from_rows(choice.hub_rows, choice.dataset)
    else:
        samples = read_image_text_samples(choice.dataset, prompt_template)
    return build_multimodal_data(
        samples,
        processor,
        choice.dataset,
        placeholders={token for ids in placeholder_token_ids(config).values() for token in ids},
        num_samples=num_samples,
        seed=seed,
        heldout_fraction=heldout_fraction,
        max_images=max_images,
        max_tokens=max_positions(config),
        bad_samples=bad_samples,
    )


def run_calibration(
    source: str,
    *,
    dataset: str,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    heldout_fraction: float,
    target_sparsity: float | None,
    min_retention: float | None,
    metric: str,
    k_min: int,
    k_max: int | None,
    renormalize: str,
    policy: str,
    device: str,
    dtype: str,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
    per_modality: bool = False,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_images: int | None = None,
    skip_bad_samples: bool = False,
) -> CalibrationOutcome:
    """Calibrate `source` and return the recipe and report; writes nothing.

    Everything cheap is checked before the model loads: the device, the config and family, the tokenizer or
    processor, every sample and `--seq-len`. `dataset=None` picks the built-in image set for
    vision-language models and the built-in text set otherwise.
    """
    from gemoe_cli.api import model_identity
    from gemoe_cli.inspection import describe_source
    from gemoe_cli.models import load_config, load_model, resolve_device
    from gemoe_cli.routing import attach_adaptive_routing

    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(device)
    description = describe_source(source, trust_remote_code=trust_remote_code)
    if not description.supported:
        from gemoe_cli.errors import UnsupportedModelError

        raise UnsupportedModelError(description.reason)
    top_k = min(layer.top_k for layer in description.layers)
    resolved_k_max = top_k if k_max is None else k_max
    if k_min < 1 or k_min > resolved_k_max:
        raise InvalidInputError(
            f"--k-min {k_min} is outside [1, k_max={resolved_k_max}]; use a value from 1 to {resolved_k_max}."
        )
    if resolved_k_max > top_k:
        raise InvalidInputError(f"--k-max {resolved_k_max} is greater than the model's K={top_k}; use at most {top_k}.")

    config = load_config(source, trust_remote_code=trust_remote_code)
    choice = choose_dataset(config, dataset)
    dataset, image_text = choice.dataset, choice.image_text
    # A .jsonl file may mix text and image samples, so its image samples are reported one by one instead.
    if not choice.vision_language and Path(dataset).suffix != ".jsonl" and is_image_text_dataset(dataset):
        raise InvalidInputError(
            f"--dataset {dataset} contains images, but model {source} is text-only; "
            f"use a text dataset such as {BUILTIN}."
        )
    if per_modality and not image_text:
        raise InvalidInputError(
            "--per-modality needs a vision-language model and image+text data; "
            f"{'the model is text-only' if not choice.vision_language else f'dataset {dataset} has no images'}."
        )
    if metric == "exact_match" and not image_text:
        raise InvalidInputError("--metric exact_match needs image+text data with answers; use nll, agreement or kl.")

    data = read_data(
        source,
        config,
        choice,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        heldout_fraction=heldout_fraction,
        prompt_template=prompt_template,
        max_images=max_images,
        skip_bad_samples=skip_bad_samples,
        trust_remote_code=trust_remote_code,
    )
    timings["data"] = time.perf_counter() - started

    started = time.perf_counter()
    model = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model.to(device)
    timings["load"] = time.perf_counter() - started

    routing = attach_adaptive_routing(model, {}, k_min=k_min, k_max=k_max, renormalize=renormalize)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            result = _calibrate_with_progress(
                model,
                routing,
                data,
                target_sparsity,
                min_retention,
                metric,
                k_min,
                k_max,
                batch_size,
                policy,
                show_progress,
                per_modality,
            )
    finally:
        identity = model_identity(model, name_or_path=source)
        routing.remove()
    timings["calibrate"] = time.perf_counter() - started

    settings = CalibrationSettings(
        dataset,
        num_samples,
        seq_len,
        batch_size,
        seed,
        heldout_fraction,
        target_sparsity,
        min_retention,
        metric,
        policy,
        per_modality,
        prompt_template if image_text and Path(dataset).is_dir() else None,
        max_images,
    )
    routing_settings = RoutingSettings(k_min=k_min, k_max=k_max, renormalize=renormalize)
    recipe = build_recipe(result, identity, routing_settings, settings, data)
    report = build_report(
        result,
        recipe,
        settings,
        timings,
        data_kind="image+text" if image_text else "text",
        bad_samples=data.bad_samples,
    )
    return CalibrationOutcome(recipe, report, result, metric)


def _calibrate_with_progress(
    model,
    routing,
    data,
    target_sparsity,
    min_retention,
    metric,
    k_min,
    k_max,
    batch_size,
    policy,
    show_progress,
    per_modality,
):
    kwargs = dict(
        target_sparsity=target_sparsity,
        min_retention=min_retention,
        metric=metric,
        k_min=k_min,
        k_max=k_max,
        batch_size=batch_size,
        policy=policy,
        per_modality=per_modality,
    )
    if not show_progress:
        return calibrate(model, routing, data, **kwargs)

    progress = _progress_bar(data)
    with progress:
        task = progress.add_task("calibrating", total=None, samples_per_second=0.0, tokens_per_second=0.0)
        started = time.perf_counter()
        seen = {"samples": 0, "tokens": 0}

        def advance(phase: str, batch: torch.Tensor) -> None:
            seen["samples"] += batch.size(0)
            seen["tokens"] += batch.numel()
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.update(
                task,
                description=f"calibrating ({phase})",
                advance=batch.size(0),
                samples_per_second=seen["samples"] / elapsed,
                tokens_per_second=seen["tokens"] / elapsed,
            )

        return calibrate(model, routing, data, progress=advance, **kwargs)
