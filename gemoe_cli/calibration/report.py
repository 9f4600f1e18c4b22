"""Turn a calibration result into a recipe (deterministic) and a JSON report (with timings)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemoe_cli import __version__
from gemoe_cli.calibration.calibrate import CalibrationResult
from gemoe_cli.calibration.data import CalibrationData
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


def _rounded(value: float, digits: int = 6) -> float:
    return float(round(value, digits))


def build_recipe(
    result: CalibrationResult,
    identity: ModelIdentity,
    routing: RoutingSettings,
    settings: CalibrationSettings,
    data: CalibrationData,
) -> Recipe:
    """Return the recipe; it holds no timings, so the same inputs and seed give the same bytes."""
    heldout = result.heldout
    calibration = {
        "tool": f"gemoe {__version__}",
        "data": {
            "dataset": settings.dataset,
            "samples_read": data.samples_read,
            "fit_blocks": int(data.fit.size(0)),
            "heldout_blocks": int(data.heldout.size(0)),
            "seq_len": settings.seq_len,
            "seed": settings.seed,
            "heldout_fraction": settings.heldout_fraction,
        },
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
    return Recipe(
        format_version=1,
        model=identity,
        routing=routing,
        layers={path: LayerRecipe(thresholds=values) for path, values in result.thresholds.items()},
        calibration=calibration,
    )


def _layer_report(statistics: LayerStatistics, thresholds: list[float], counters: dict, cost: float | None) -> dict:
    tokens = counters.get("tokens", 0)
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


def _mean_entropy(statistics: LayerStatistics) -> float:
    centers = statistics.bin_edges()[:-1] + statistics.bin_width / 2
    return float(np.dot(centers, statistics.counts) / max(statistics.tokens, 1))


def build_report(
    result: CalibrationResult, recipe: Recipe, settings: CalibrationSettings, seconds: dict[str, float]
) -> dict:
    """Return the JSON report: per-layer entropy quantiles, k histograms, sparsity, thresholds, timings."""
    layers = {
        path: _layer_report(
            result.final_statistics.layers[path],
            result.thresholds[path],
            result.heldout_counters.get(path, {}),
            result.layer_costs.get(path),
        )
        for path in result.thresholds
    }
    return {
        "tool": f"gemoe {__version__}",
        "model": recipe.model.model_dump(),
        "settings": settings.__dict__,
        "target_sparsity": result.target_sparsity,
        "drift_rounds": result.drift_rounds,
        "fit_sparsity": result.fit_sparsity,
        "heldout": result.heldout.to_json(),
        "retention_search": result.search,
        "seconds": seconds,
        "statistics_memory_bytes": sum(
            layer.counts.nbytes + layer.dropped_mass.nbytes for layer in result.final_statistics.layers.values()
        ),
        "layers": layers,
    }
