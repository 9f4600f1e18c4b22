"""Turn a calibration result into a recipe (deterministic) and a JSON report (with timings).

For vision-language models the report splits each layer's statistics by token modality: entropy quantiles,
mean normalised entropy, held-out `k` histogram and held-out sparsity for image tokens and text tokens apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemoe_cli import __version__
from gemoe_cli.calibration.calibrate import CalibrationResult
from gemoe_cli.calibration.data import CalibrationData
from gemoe_cli.calibration.multimodal import MultimodalCalibrationData
from gemoe_cli.calibration.statistics import LayerStatistics
from gemoe_cli.recipe import LayerRecipe, ModelIdentity, Recipe, RoutingSettings

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class CalibrationSettings:
    """What a user asked for, recorded in the recipe's `calibration` section."""

    dataset: str
    num_samples: int
    seq_len: int
    batch_size: int
    seed: int
    heldout_fraction: float
    target_sparsity: float | None
    min_retention: float | None
    metric: str
    policy: str
    per_modality: bool = False
    prompt_template: str | None = None
    max_images: int | None = None


def _rounded(value: float, digits: int = 6) -> float:
    return float(round(value, digits))


def build_recipe(
    result: CalibrationResult,
    identity: ModelIdentity,
    routing: RoutingSettings,
    settings: CalibrationSettings,
    data: CalibrationData | MultimodalCalibrationData,
) -> Recipe:
    """Return the recipe; it holds no timings, so the same inputs and seed give the same bytes."""
    heldout = result.heldout
    image_text = isinstance(data, MultimodalCalibrationData)
    data_record = {
        "dataset": settings.dataset,
        "samples_read": data.samples_read,
        "seed": settings.seed,
        "heldout_fraction": settings.heldout_fraction,
    }
    if image_text:
        data_record.update(kind="image+text", fit_samples=data.fit_count, heldout_samples=data.heldout_count)
        if settings.prompt_template is not None:
            data_record["prompt_template"] = settings.prompt_template
        if settings.max_images is not None:
            data_record["max_images"] = settings.max_images
    else:
        data_record.update(fit_blocks=data.fit_count, heldout_blocks=data.heldout_count, seq_len=settings.seq_len)
    if data.bad_samples and data.bad_samples["skipped"]:
        data_record["skipped_samples"] = data.bad_samples["skipped"]
    calibration = {
        "tool": f"gemoe {__version__}",
        "data": data_record,
        "budget": {
            "target_sparsity": settings.target_sparsity,
            "min_retention": settings.min_retention,
            "metric": settings.metric,
        },
        "policy": settings.policy,
        "measured": {
            "fit_sparsity": _rounded(result.fit_sparsity),
            "heldout_sparsity": _rounded(heldout.sparsity),
            "heldout_retention": _rounded(heldout.retention(settings.metric)),
            "heldout_tokens": heldout.tokens,
        },
    }
    if settings.per_modality:
        calibration["per_modality"] = True
    if heldout.modality_sparsity:
        calibration["measured"]["heldout_modality_sparsity"] = {
            name: _rounded(value) for name, value in heldout.modality_sparsity.items()
        }
    if heldout.exact_match is not None:
        calibration["measured"]["heldout_exact_match"] = _rounded(heldout.exact_match)
    layers = {
        path: LayerRecipe(thresholds=values, modalities=result.modality_thresholds.get(path) or None)
        for path, values in result.thresholds.items()
    }
    return Recipe(format_version=1, model=identity, routing=routing, layers=layers, calibration=calibration)


def _layer_report(statistics: LayerStatistics, thresholds: list[float], counters: dict, cost: float | None) -> dict:
    tokens = counters.get("tokens", 0)
    if statistics.tokens == 0:
        cost = None
    return {
        "num_experts": statistics.num_experts,
        "top_k": statistics.top_k,
        "thresholds": thresholds,
        "entropy_quantiles": {str(level): statistics.quantile(level) for level in QUANTILE_LEVELS},
        "normalised_mean_entropy": _mean_entropy(statistics) / statistics.max_entropy,
        "quality_cost": cost,
        "heldout_k_histogram": counters.get("k_histogram", []),
        "heldout_sparsity": 1 - counters.get("active_pairs", 0) / (statistics.top_k * tokens) if tokens else None,
        "heldout_nonfinite_tokens": counters.get("nonfinite_tokens", 0),
    }


def _modality_reports(result: CalibrationResult, path: str, counters: dict) -> dict:
    """Return one layer's statistics by modality: entropy, held-out k histogram and sparsity, thresholds."""
    reports = {}
    histograms = counters.get("modality_k_histograms", {})
    for name, by_layer in result.final_statistics.modalities.items():
        statistics = by_layer.layers.get(path)
        if statistics is None or statistics.tokens == 0:
            continue
        histogram = histograms.get(name, [])
        tokens = sum(histogram)
        active = sum(k * count for k, count in enumerate(histogram))
        reports[name] = {
            "calibration_tokens": statistics.tokens,
            "entropy_quantiles": {str(level): statistics.quantile(level) for level in QUANTILE_LEVELS},
            "normalised_mean_entropy": _mean_entropy(statistics) / statistics.max_entropy,
            "thresholds": result.modality_thresholds.get(path, {}).get(name, result.thresholds[path]),
            "heldout_k_histogram": histogram,
            "heldout_sparsity": 1 - active / (statistics.top_k * tokens) if tokens else None,
        }
    return reports


def _mean_entropy(statistics: LayerStatistics) -> float:
    centers = statistics.bin_edges()[:-1] + statistics.bin_width / 2
    return float(np.dot(centers, statistics.counts) / max(statistics.tokens, 1))


def build_report(
    result: CalibrationResult,
    recipe: Recipe,
    settings: CalibrationSettings,
    seconds: dict[str, float],
    data_kind: str = "text",
    bad_samples: dict | None = None,
) -> dict:
    """Return the JSON report: per-layer entropy quantiles, k histograms, sparsity, thresholds, timings.

    Vision-language layers also get a ``modalities`` entry with the same figures per token modality.
    """
    layers = {}
    for path in result.thresholds:
        counters = result.heldout_counters.get(path, {})
        layers[path] = _layer_report(
            result.final_statistics.layers[path], result.thresholds[path], counters, result.layer_costs.get(path)
        )
        modalities = _modality_reports(result, path, counters)
        if modalities:
            layers[path]["modalities"] = modalities
    return {
        "tool": f"gemoe {__version__}",
        "model": recipe.model.model_dump(),
        "settings": settings.__dict__,
        "target_sparsity": result.target_sparsity,
        "drift_rounds": result.drift_rounds,
        "fit_sparsity": result.fit_sparsity,
        "heldout": result.heldout.to_json(),
        "retention_search": result.search,
        "data": {"kind": data_kind, "bad_samples": bad_samples},
        "layer_costs": result.layer_costs,
        "seconds": seconds,
        "statistics_memory_bytes": sum(
            layer.counts.nbytes + layer.dropped_mass.nbytes for layer in result.final_statistics.layers.values()
        ),
        "layers": layers,
    }
