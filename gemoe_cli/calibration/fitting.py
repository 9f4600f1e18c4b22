"""Fit per-layer entropy thresholds to a sparsity target from calibration statistics.

Two policies:

- `fit_uniform_quantile` (the baseline): every layer uses the same entropy quantile levels
  ``u_j = min(1, j * q)``, with one `q` for the whole model.
- `fit_allocated` (the default): a Lagrangian allocation. Each entropy bin of each layer takes the `k`
  that minimises ``w_l * D_b(k) + lam * k``, where ``D_b(k)`` is the mean routing mass dropped when its
  tokens keep `k` experts and ``w_l`` is the measured quality cost of dropping mass in layer `l`. One
  multiplier `lam` for all layers equalises the marginal quality cost of a removed expert activation,
  so sparsity goes where it is cheapest. `lam` is found by bisection to hit the target.

Both return thresholds for ``k = clamp(k_min + #{j : H > tau_j}, k_min, k_max)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gemoe_cli.calibration.statistics import CalibrationStatistics, LayerStatistics

_BISECTION_STEPS = 60


@dataclass(frozen=True)
class Fit:
    """Thresholds per layer and the sparsity the statistics predict for them."""

    thresholds: dict[str, list[float]]
    predicted_sparsity: float


def thresholds_from_bin_k(layer: LayerStatistics, bin_k: np.ndarray, k_min: int, k_max: int) -> list[float]:
    """Turn a non-decreasing k per entropy bin (B,) into thresholds ``tau_1..tau_{k_max - k_min}``.

    ``tau_j`` sits just below the first bin whose tokens need at least ``k_min + j`` experts; `-inf` when
    that is the first bin and `+inf` when no bin needs that many.
    """
    edges = layer.bin_edges()
    epsilon = layer.bin_width * 1e-3
    thresholds = []
    for level in range(k_min + 1, k_max + 1):
        needing = np.nonzero(bin_k >= level)[0]
        if needing.size == 0:
            thresholds.append(math.inf)
        elif needing[0] == 0:
            thresholds.append(-math.inf)
        else:
            thresholds.append(float(edges[needing[0]] - epsilon))
    return thresholds


def _layer_k_max(layer: LayerStatistics, k_max: int | None) -> int:
    return layer.top_k if k_max is None else min(k_max, layer.top_k)


def _predicted_sparsity(statistics: CalibrationStatistics, bin_ks: Mapping[str, np.ndarray]) -> float:
    active = static = 0.0
    for path, layer in statistics.layers.items():
        active += float((layer.counts * bin_ks[path]).sum())
        static += float(layer.counts.sum()) * layer.top_k
    return 1.0 - active / static if static else 0.0


def _bisect(predict, target: float, low: float, high: float) -> float:
    """Find the parameter whose predicted sparsity is closest to `target`; `predict` must be increasing."""
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if predict(middle) < target:
            low = middle
        else:
            high = middle
    return high if abs(predict(high) - target) <= abs(predict(low) - target) else low


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} is outside [0, 1)")


def fit_uniform_quantile(
    statistics: CalibrationStatistics, target: float, k_min: int = 1, k_max: int | None = None
) -> Fit:
    """Fit the baseline: the same quantile levels ``min(1, j * q)`` in every layer."""
    _check_target(target)

    def bin_ks(q: float) -> dict[str, np.ndarray]:
        result = {}
        for path, layer in statistics.layers.items():
            top = _layer_k_max(layer, k_max)
            cumulative = np.cumsum(layer.counts) / max(layer.tokens, 1)
            below = np.concatenate([[0.0], cumulative[:-1]])  # share of tokens in lower bins
            # A bin belongs to level j when its tokens lie above the quantile ``min(1, j * q)``.
            levels = np.arange(1, top - k_min + 1)
            crossed = (below[:, None] >= np.minimum(1.0, levels * q)[None, :] - 1e-12).sum(axis=1)
            result[path] = np.minimum(k_min + crossed, top)
        return result

    # Sparsity falls as q grows: q = 0 puts every token above all quantiles (k_max).
    q = _bisect(lambda value: _predicted_sparsity(statistics, bin_ks(value)), target, 0.0, 1.0)
    ks = bin_ks(q)
    thresholds = {
        path: thresholds_from_bin_k(layer, ks[path], k_min, _layer_k_max(layer, k_max))
        for path, layer in statistics.layers.items()
    }
    return Fit(thresholds, _predicted_sparsity(statistics, ks))


def fit_allocated(
    statistics: CalibrationStatistics,
    target: float,
    layer_costs: Mapping[str, float] | None = None,
    k_min: int = 1,
    k_max: int | None = None,
) -> Fit:
    """Fit thresholds that reach `target` sparsity at the least predicted quality cost.

    Args:
        layer_costs: quality cost of dropping one unit of routing mass in each layer (``w_l``); all 1 when
            not given, which allocates by dropped routing mass alone.
    """
    _check_target(target)
    costs = {path: 1.0 for path in statistics.layers} if layer_costs is None else dict(layer_costs)
    tables = {path: layer.mean_dropped_mass() for path, layer in statistics.layers.items()}

    def bin_ks(multiplier: float) -> dict[str, np.ndarray]:
        result = {}
        for path, layer in statistics.layers.items():
            top = _layer_k_max(layer, k_max)
            choices = np.arange(k_min, top + 1)
            objective = costs[path] * tables[path][:, choices] + multiplier * choices[None, :]  # (B, choices)
            chosen = choices[np.argmin(objective, axis=1)]
            chosen[layer.counts == 0] = k_min
            # Entropy-monotone k: a more uncertain token never gets fewer experts.
            result[path] = np.maximum.accumulate(chosen)
        return result

    # Sparsity grows with the multiplier; search it on a log scale.
    log_multiplier = _bisect(
        lambda value: _predicted_sparsity(statistics, bin_ks(math.exp(value))), target, -30.0, 10.0
    )
    ks = bin_ks(math.exp(log_multiplier))
    thresholds = {
        path: thresholds_from_bin_k(layer, ks[path], k_min, _layer_k_max(layer, k_max))
        for path, layer in statistics.layers.items()
    }
    return Fit(thresholds, _predicted_sparsity(statistics, ks))


def max_sparsity(statistics: CalibrationStatistics, k_min: int = 1) -> float:
    """Return the highest reachable sparsity: every token at ``k_min``."""
    total = sum(layer.tokens * layer.top_k for layer in statistics.layers.values())
    active = sum(layer.tokens * k_min for layer in statistics.layers.values())
    return 1.0 - active / total if total else 0.0
