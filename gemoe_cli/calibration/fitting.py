"""Fit per-layer entropy thresholds to a sparsity target from calibration statistics.

Two policies:

- `fit_uniform_quantile` (the baseline): every layer uses the same entropy quantile levels
  ``u_j = min(1, j * q)``, with one `q` for the whole model.
- `fit_allocated` (the default): a Lagrangian allocation. Each entropy bin of each layer takes the `k`
  that minimises ``w_l * D_b(k) + lam * k``, where ``D_b(k)`` is the mean routing mass dropped when its
  tokens keep `k` experts and ``w_l`` is the measured quality cost of dropping mass in layer `l`. One
  multiplier `lam` for all layers equalises the marginal quality cost of a removed expert activation,
  so sparsity goes where it is cheapest. `lam` is found by bisection to hit the target.

Both return thresholds for ``k = clamp(k_min + #{j : H > tau_j}, k_min, k_max)``. A layer that saw no
calibration token (the vision experts of Ernie 4.5 VL on text data, Qwen3-Omni's talker) gets all ``-inf``
thresholds: static top-k, since nothing was measured to justify dropping experts there.

The statistics may be keyed by (layer, modality) pairs (`statistics.keyed_by_modality`); each pair is then
fitted as a layer of its own, so sparsity goes to the modality where it costs least.
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


def _bracket(predict, target: float, low: float, high: float) -> tuple[float, float]:
    """Narrow [low, high] around the parameter where the increasing `predict` crosses `target`."""
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if predict(middle) < target:
            low = middle
        else:
            high = middle
    return low, high


def _tokens_above(layer: LayerStatistics, threshold: float) -> float:
    """Return how many tokens have entropy above `threshold`, counting tokens spread evenly inside a bin."""
    position = threshold / layer.bin_width
    if position < 0:
        return float(layer.tokens)
    if position >= layer.num_bins:
        return 0.0
    index = int(position)
    return float(layer.counts[index + 1 :].sum()) + float(layer.counts[index]) * (1.0 - (position - index))


def predicted_sparsity(statistics: CalibrationStatistics, thresholds: Mapping[str, list[float]], k_min: int) -> float:
    """Return the sparsity that `thresholds` give on the statistics, with thresholds anywhere inside a bin."""
    active = static = 0.0
    for path, layer in statistics.layers.items():
        if layer.tokens == 0:
            continue
        active += k_min * layer.tokens + sum(_tokens_above(layer, value) for value in thresholds[path])
        static += layer.top_k * layer.tokens
    return 1.0 - active / static if static else 0.0


def _interpolated_fit(statistics, bin_ks_low, bin_ks_high, target, k_min, k_max) -> Fit:
    """Blend the thresholds of the two bracketing solutions so predicted sparsity meets `target`.

    A bin-level solution jumps when a crowded bin changes its k; moving the threshold inside that bin (its
    tokens assumed spread evenly) makes sparsity continuous in the blend.
    """
    below, above = {}, {}
    for path, layer in statistics.layers.items():
        top = _layer_k_max(layer, k_max)
        # Entropy lies in [0, log E], so clamping infinities to just outside that range changes no decision.
        low_end, high_end = -layer.bin_width, layer.max_entropy + layer.bin_width
        below[path] = np.clip(thresholds_from_bin_k(layer, bin_ks_low[path], k_min, top), low_end, high_end)
        above[path] = np.clip(thresholds_from_bin_k(layer, bin_ks_high[path], k_min, top), low_end, high_end)

    def blend(fraction: float) -> dict[str, list[float]]:
        return {path: list(below[path] + fraction * (above[path] - below[path])) for path in below}

    low, high = _bracket(lambda fraction: predicted_sparsity(statistics, blend(fraction), k_min), target, 0.0, 1.0)
    fraction = high if predicted_sparsity(statistics, blend(high), k_min) <= target + 1e-9 else low
    thresholds = {
        path: [_restore_infinity(value, statistics.layers[path]) for value in values]
        for path, values in blend(fraction).items()
    }
    return Fit(thresholds, predicted_sparsity(statistics, thresholds, k_min))


def _restore_infinity(value: float, layer: LayerStatistics) -> float:
    if value < 0:
        return -math.inf
    if value > layer.max_entropy:
        return math.inf
    return float(value)


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
            if layer.tokens == 0:
                result[path] = np.full(layer.num_bins, top)
                continue
            cumulative = np.cumsum(layer.counts) / max(layer.tokens, 1)
            below = np.concatenate([[0.0], cumulative[:-1]])  # share of tokens in lower bins
            # A bin belongs to level j when its tokens lie above the quantile ``min(1, j * q)``.
            levels = np.arange(1, top - k_min + 1)
            crossed = (below[:, None] >= np.minimum(1.0, levels * q)[None, :] - 1e-12).sum(axis=1)
            result[path] = np.minimum(k_min + crossed, top)
        return result

    # Sparsity falls as q grows: q = 0 puts every token above all quantiles (k_max).
    low, high = _bracket(lambda value: _predicted_sparsity(statistics, bin_ks(value)), target, 0.0, 1.0)
    return _interpolated_fit(statistics, bin_ks(low), bin_ks(high), target, k_min, k_max)


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
            if layer.tokens == 0:
                result[path] = np.full(layer.num_bins, top)
                continue
            choices = np.arange(k_min, top + 1)
            objective = costs[path] * tables[path][:, choices] + multiplier * choices[None, :]  # (B, choices)
            chosen = choices[np.argmin(objective, axis=1)]
            chosen[layer.counts == 0] = k_min
            # Entropy-monotone k: a more uncertain token never gets fewer experts.
            result[path] = np.maximum.accumulate(chosen)
        return result

    # Sparsity grows with the multiplier; search it on a log scale.
    low, high = _bracket(lambda value: _predicted_sparsity(statistics, bin_ks(math.exp(value))), target, -30.0, 10.0)
    return _interpolated_fit(statistics, bin_ks(math.exp(low)), bin_ks(math.exp(high)), target, k_min, k_max)


def max_sparsity(statistics: CalibrationStatistics, k_min: int = 1) -> float:
    """Return the highest reachable sparsity: every token at ``k_min``."""
    total = sum(layer.tokens * layer.top_k for layer in statistics.layers.values())
    active = sum(layer.tokens * k_min for layer in statistics.layers.values())
    return 1.0 - active / total if total else 0.0


def min_sparsity(statistics: CalibrationStatistics, k_max: int | None = None) -> float:
    """Return the lowest reachable sparsity: every token at ``min(k_max, K)`` of its layer's K experts."""
    total = sum(layer.tokens * layer.top_k for layer in statistics.layers.values())
    active = sum(layer.tokens * _layer_k_max(layer, k_max) for layer in statistics.layers.values())
    return 1.0 - active / total if total else 0.0


def fit_layer_offsets(
    statistics: CalibrationStatistics,
    target: float,
    offsets: Mapping[str, float],
    k_min: int = 1,
    k_max: int | None = None,
) -> Fit:
    """Fit each layer alone, with the uniform-quantile shape, to ``target + offsets[layer]`` sparsity.

    Offsets move sparsity between layers; they should add up to about zero (token-weighted). A layer's
    own target is clamped to what it can reach, and layers without tokens stay static.
    """
    thresholds: dict[str, list[float]] = {}
    for path, layer in statistics.layers.items():
        single = CalibrationStatistics({path: layer})
        top = _layer_k_max(layer, k_max)
        if layer.tokens == 0:
            thresholds[path] = [-math.inf] * (top - k_min)
            continue
        layer_target = min(max(target + offsets.get(path, 0.0), 0.0), max_sparsity(single, k_min) - 1e-9)
        thresholds[path] = fit_uniform_quantile(single, layer_target, k_min, k_max).thresholds[path]
    return Fit(thresholds, predicted_sparsity(statistics, thresholds, k_min))
