"""Calibration, phase by phase: collect statistics, measure layer costs, fit with drift, measure held-out.

1. Collect gating-entropy statistics of the static model on the fitting part.
2. Measure each layer's quality cost: NLL increase per unit of dropped routing mass when that layer
   alone routes adaptively.
3. Fit thresholds (Lagrangian allocation by default), then correct for drift: run the adaptive model,
   recollect statistics (later layers now see adaptively routed hidden states), and refit until the
   measured sparsity on the fitting part is on target.
4. Measure sparsity and retention of the adaptive model on the held-out part.

With a retention budget, the sparsity target is searched by bisection on held-out retention.

With `per_modality`, each (layer, modality) pair of a vision-language model is fitted as a layer of its own:
image tokens and text tokens get separate thresholds, and one Lagrange multiplier spreads the sparsity over
layers and modalities by measured cost. The pairs are keyed ``path@modality`` (`statistics.modality_key`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from gemoe_cli.calibration.data import CalibrationData
from gemoe_cli.calibration.fitting import (
    Fit,
    fit_allocated,
    fit_layer_offsets,
    fit_uniform_quantile,
    max_sparsity,
    min_sparsity,
)
from gemoe_cli.calibration.retention import Evaluation, Metric, evaluate, mean_nll, model_forward
from gemoe_cli.calibration.statistics import (
    CalibrationStatistics,
    StatisticsCollector,
    keyed_by_modality,
    split_modality_key,
)
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.routing import AdaptiveRouting

logger = logging.getLogger(__name__)

SPARSITY_TOLERANCE = 0.002
"""Drift correction stops once measured fit-part sparsity is this close to the target."""
MAX_DRIFT_ROUNDS = 8
COST_PROBE_BLOCKS = 32
OFFSET_SEARCH_BLOCKS = 48
"""Fit-part blocks on which the layer allocation search measures NLL."""
OFFSET_STEPS = (0.08, 0.04, 0.02)
"""Sparsity moved between layers per search step, coarse to fine."""
"""Fit-part blocks used to measure each layer's quality cost (the cost only needs relative accuracy)."""
RETENTION_SEARCH_STEPS = 7
Policy = str  # "allocated" or "uniform"


@dataclass
class CalibrationResult:
    """Fitted thresholds and everything measured on the way.

    `thresholds` hold each layer's shared thresholds. With a per-modality fit they are all ``-inf`` (static
    routing for tokens of a modality the calibration data did not have), and `modality_thresholds` holds the
    fitted ones by layer and modality name.
    """

    thresholds: dict[str, list[float]]
    target_sparsity: float
    fit_sparsity: float
    heldout: Evaluation
    static_statistics: CalibrationStatistics
    final_statistics: CalibrationStatistics
    layer_costs: dict[str, float]
    drift_rounds: int
    heldout_counters: dict = field(default_factory=dict)
    search: list[dict] = field(default_factory=list)
    modality_thresholds: dict[str, dict[str, list[float]]] = field(default_factory=dict)


Progress = Callable[[str, torch.Tensor], None]


def collect_statistics(model, routing: AdaptiveRouting, batches, *, static: bool, progress: Progress | None = None):
    """Run `batches` and return (statistics, measured sparsity); with `static`, routing stays static.

    A batch is a (B, L) tensor of token ids or a `MultimodalBatch` (image+text sample).
    """
    routing.reset_counters()
    with StatisticsCollector(routing) as collector, torch.no_grad():
        for batch in batches:
            if static:
                with routing.static():
                    model_forward(model, batch.to(_device(model)))
            else:
                model_forward(model, batch.to(_device(model)))
            if progress is not None:
                progress("statistics", batch)
    return collector.statistics, (0.0 if static else routing.sparsity())


def _device(model) -> torch.device:
    return next(model.parameters()).device


def fit_view(statistics: CalibrationStatistics, per_modality: bool) -> CalibrationStatistics:
    """Return the statistics a fit works on: per layer, or per (layer, modality) pair."""
    return keyed_by_modality(statistics) if per_modality else statistics


def apply_thresholds(routing: AdaptiveRouting, thresholds: Mapping[str, list[float]]) -> None:
    """Set fitted thresholds, keyed by layer path or by ``path@modality``, on the attached routing."""
    shared: dict[str, list[float]] = {}
    by_modality: dict[str, dict[str, list[float]]] = {}
    for key, values in thresholds.items():
        path, modality = split_modality_key(key)
        if modality is None:
            shared[path] = values
        else:
            by_modality.setdefault(path, {})[modality] = values
    routing.set_thresholds(shared)
    routing.set_modality_thresholds(by_modality)


def measure_layer_costs(
    model,
    routing: AdaptiveRouting,
    statistics: CalibrationStatistics,
    batches,
    probe_sparsity: float,
    k_min: int,
    k_max: int | None,
) -> dict[str, float]:
    """Return each layer's NLL increase per unit of dropped routing mass per token, measured in isolation.

    Each layer (or ``path@modality`` pair, for per-modality statistics) gets thresholds for `probe_sparsity`
    on its own while everything else stays static. A layer that saw no tokens gets cost 1; it is never fitted.
    """
    batches = batches[: max(1, COST_PROBE_BLOCKS // max(1, batches[0].size(0)))]
    with routing.static():
        reference = mean_nll(model, batches)

    costs = {}
    for key, layer_statistics in statistics.layers.items():
        if layer_statistics.tokens == 0:
            costs[key] = 1.0
            continue
        path, modality = split_modality_key(key)
        layer = routing.layers[path]
        single = CalibrationStatistics({key: layer_statistics})
        probe = fit_allocated(single, min(probe_sparsity, max_sparsity(single, k_min)), k_min=k_min, k_max=k_max)
        previous = (layer.thresholds, layer.modality_thresholds)
        others = {other: routing.layers[other].enabled for other in routing.layers}
        try:
            if modality is None:
                layer.set_thresholds(probe.thresholds[key])
            else:
                layer.set_modality_thresholds({modality: probe.thresholds[key]})
            for other_path, other in routing.layers.items():
                other.enabled = other_path == path
            nll = mean_nll(model, batches)
        finally:
            layer.thresholds, layer.modality_thresholds = previous
            for other_path, other in routing.layers.items():
                other.enabled = others[other_path]
        dropped = _predicted_dropped_mass(layer_statistics, probe.thresholds[key], k_min)
        costs[key] = max(nll - reference, 1e-6) / max(dropped, 1e-9)
    return costs


def search_layer_offsets(
    model,
    routing: AdaptiveRouting,
    statistics: CalibrationStatistics,
    batches,
    target: float,
    k_min: int,
    k_max: int | None,
) -> dict[str, float]:
    """Search how to spread `target` sparsity over layers, by measured NLL on a subset of the fitting part.

    Starts from the uniform-quantile allocation (all offsets 0) and moves sparsity into or out of one layer
    at a time, taking it from or giving it to all others, while the measured NLL improves; the step then
    halves. Every accepted move lowered the measured NLL, so the result is never worse than the baseline
    on the subset. Returns the sparsity offset of each layer (or ``path@modality`` pair).
    """
    batches = batches[: max(1, OFFSET_SEARCH_BLOCKS // max(1, batches[0].size(0)))]
    fitted = [key for key, layer in statistics.layers.items() if layer.tokens > 0]
    offsets = {key: 0.0 for key in fitted}
    if len(fitted) < 2:
        return offsets
    tokens = {key: statistics.layers[key].tokens for key in fitted}
    ceilings = {key: max_sparsity(CalibrationStatistics({key: statistics.layers[key]}), k_min) for key in fitted}

    def measured_nll(candidate: dict[str, float]) -> float:
        apply_thresholds(routing, fit_layer_offsets(statistics, target, candidate, k_min, k_max).thresholds)
        return mean_nll(model, batches)

    best = measured_nll(offsets)
    for step in OFFSET_STEPS:
        improved = True
        while improved:
            improved = False
            for key in fitted:
                for direction in (1.0, -1.0):
                    candidate = _moved(offsets, key, direction * step, tokens)
                    if not all(0.0 <= target + candidate[k] <= ceilings[k] for k in fitted):
                        continue
                    nll = measured_nll(candidate)
                    if nll < best - 1e-7:
                        best, offsets, improved = nll, candidate, True
    logger.info("layer sparsity offsets: %s (subset NLL %.5f)", offsets, best)
    return offsets


def _moved(offsets: dict[str, float], key: str, amount: float, tokens: dict[str, int]) -> dict[str, float]:
    """Add `amount` sparsity to one layer and take it evenly (token-weighted) from the others."""
    others = [other for other in offsets if other != key]
    other_tokens = sum(tokens[other] for other in others)
    moved = dict(offsets)
    moved[key] += amount
    for other in others:
        moved[other] -= amount * tokens[key] / other_tokens
    return moved


def _predicted_dropped_mass(layer_statistics, thresholds, k_min: int) -> float:
    """Return the mean dropped routing mass per token that `thresholds` cause, from the histogram."""
    centers = layer_statistics.bin_edges()[:-1] + layer_statistics.bin_width / 2
    k = k_min + (centers[:, None] > torch.tensor(thresholds).numpy()[None, :]).sum(axis=1)
    table = layer_statistics.mean_dropped_mass()
    per_bin = table[range(len(k)), k] * layer_statistics.counts
    return float(per_bin.sum() / max(layer_statistics.tokens, 1))


def fit_with_drift(
    model,
    routing: AdaptiveRouting,
    statistics: CalibrationStatistics,
    batches,
    target: float,
    *,
    policy: Policy,
    layer_costs: dict[str, float] | None,
    k_min: int,
    k_max: int | None,
    progress: Progress | None = None,
    per_modality: bool = False,
) -> tuple[Fit, CalibrationStatistics, float, int]:
    """Fit thresholds, then correct them for drift until the adaptive model's measured sparsity is on target.

    Round 1 fits on static statistics and recollects statistics from the adaptive model, whose later layers
    see adaptively routed hidden states. Later rounds refit on those drifted statistics and search the aimed
    sparsity (regula falsi on the measured sparsity) until it is within `SPARSITY_TOLERANCE` of `target`.

    Returns the fit, the statistics it was fitted on, the measured fit-part sparsity and the rounds used.
    With `per_modality`, the fit works on `fit_view(statistics, True)` and its thresholds are keyed
    ``path@modality``; the statistics returned are the full ones.
    """
    ceiling = max_sparsity(statistics, k_min)
    aim = target
    points: list[tuple[float, float]] = []  # (aim, measured) of rounds on drifted statistics
    best = None
    for round_number in range(1, MAX_DRIFT_ROUNDS + 1):
        aim = min(max(aim, 0.0), ceiling)
        view = fit_view(statistics, per_modality)
        if policy == "uniform":
            fit = fit_uniform_quantile(view, aim, k_min, k_max)
        else:
            fit = fit_layer_offsets(view, aim, layer_costs or {}, k_min, k_max)
        apply_thresholds(routing, fit.thresholds)
        drifted, measured = collect_statistics(model, routing, batches, static=False, progress=progress)
        logger.info("drift round %d: aimed %.4f, measured %.4f", round_number, aim, measured)

        error = abs(measured - target)
        if best is None or error < best[0]:
            best = (error, fit, statistics, measured)
        if error <= SPARSITY_TOLERANCE:
            break
        if round_number == 1:
            statistics = drifted
            aim = target
            continue
        points.append((aim, measured))
        aim = _next_aim(points, target, aim, measured)

    _, fit, fitted_on, measured = best
    apply_thresholds(routing, fit.thresholds)
    return fit, fitted_on, measured, round_number


def _next_aim(points: list[tuple[float, float]], target: float, aim: float, measured: float) -> float:
    below = [point for point in points if point[1] < target]
    above = [point for point in points if point[1] > target]
    if not below or not above:
        return aim + (target - measured)
    low = max(below, key=lambda point: point[1])
    high = min(above, key=lambda point: point[1])
    if high[1] == low[1]:
        return 0.5 * (low[0] + high[0])
    guess = low[0] + (target - low[1]) * (high[0] - low[0]) / (high[1] - low[1])
    if any(abs(guess - point[0]) < 1e-9 for point in points):
        return 0.5 * (low[0] + high[0])
    return guess


def calibrate(
    model,
    routing: AdaptiveRouting,
    data: CalibrationData,
    *,
    target_sparsity: float | None,
    min_retention: float | None,
    metric: Metric = "nll",
    k_min: int = 1,
    k_max: int | None = None,
    batch_size: int = 8,
    policy: Policy = "allocated",
    progress: Progress | None = None,
    per_modality: bool = False,
) -> CalibrationResult:
    """Fit thresholds on `data.fit` for a sparsity and/or retention budget, measured on `data.heldout`.

    `data` is a `CalibrationData` (token blocks) or a `MultimodalCalibrationData` (image+text samples).
    With `per_modality`, image and text tokens get thresholds of their own (see the module docstring).

    Raises:
        InvalidInputError: the budget is unreachable (the message gives the reachable frontier), or
            `per_modality` is set but the statistics hold a single modality.
    """
    if target_sparsity is None and min_retention is None:
        raise InvalidInputError("no budget given; pass --target-sparsity, --min-retention or both.")
    fit_batches = data.batches("fit", batch_size)
    heldout_batches = data.batches("heldout", batch_size)

    static_statistics, _ = collect_statistics(model, routing, fit_batches, static=True, progress=progress)
    if per_modality and len(static_statistics.modalities) < 2:
        seen = ", ".join(static_statistics.modalities) or "none (a text-only model)"
        raise InvalidInputError(
            f"--per-modality needs a vision-language model and image+text data, but the calibration tokens had "
            f"one modality ({seen}); drop --per-modality or use image+text data."
        )
    ceiling = max_sparsity(static_statistics, k_min)
    if target_sparsity is not None and target_sparsity > ceiling:
        raise InvalidInputError(
            f"--target-sparsity {target_sparsity} is unreachable: with --k-min {k_min} the highest sparsity is "
            f"{ceiling:.4f}; lower the target or --k-min."
        )
    floor = min_sparsity(static_statistics, k_max)
    if target_sparsity is not None and target_sparsity < floor:
        raise InvalidInputError(
            f"--target-sparsity {target_sparsity} is unreachable: with --k-max {k_max} the lowest sparsity is "
            f"{floor:.4f}; raise --k-max or the target."
        )

    probe = target_sparsity if target_sparsity is not None else 0.3
    costs = None
    if policy == "allocated":
        costs = search_layer_offsets(
            model, routing, fit_view(static_statistics, per_modality), fit_batches, probe, k_min, k_max
        )

    def run(target: float) -> tuple[Fit, CalibrationStatistics, float, int, Evaluation]:
        fit, drifted, measured, rounds = fit_with_drift(
            model,
            routing,
            static_statistics,
            fit_batches,
            target,
            policy=policy,
            layer_costs=costs,
            k_min=k_min,
            k_max=k_max,
            progress=progress,
            per_modality=per_modality,
        )
        heldout = evaluate(model, routing, heldout_batches)
        return fit, drifted, measured, rounds, heldout

    search: list[dict] = []
    if target_sparsity is not None:
        target = target_sparsity
        fit, drifted, measured, rounds, heldout = run(target)
        search.append(_search_point(target, heldout, metric))
        if min_retention is not None and heldout.retention(metric) < min_retention:
            best = _best_under_retention(run, min_retention, metric, floor, ceiling, search)
            frontier = _frontier(search)
            raise InvalidInputError(
                f"budget unreachable: --target-sparsity {target_sparsity} gives held-out {metric} retention "
                f"{heldout.retention(metric):.4f} < --min-retention {min_retention}; the best reachable pair is "
                f"{best}; measured frontier (sparsity, retention): {frontier}."
            )
    else:
        target, fit, drifted, measured, rounds, heldout = _search_retention(
            run, min_retention, metric, floor, ceiling, search
        )

    shared, by_modality = _split_thresholds(routing, fit.thresholds)
    return CalibrationResult(
        thresholds=shared,
        modality_thresholds=by_modality,
        target_sparsity=target,
        fit_sparsity=measured,
        heldout=heldout,
        static_statistics=static_statistics,
        final_statistics=drifted,
        layer_costs=costs or {},
        drift_rounds=rounds,
        heldout_counters={path: counters.__dict__ for path, counters in routing.counters().items()},
        search=search,
    )


def _split_thresholds(routing: AdaptiveRouting, thresholds: Mapping[str, list[float]]):
    """Return (shared thresholds per layer, thresholds per layer and modality) of a fit.

    A per-modality fit leaves each layer's shared thresholds at the values routing has (all ``-inf``).
    """
    shared: dict[str, list[float]] = {}
    by_modality: dict[str, dict[str, list[float]]] = {}
    for key, values in thresholds.items():
        path, modality = split_modality_key(key)
        if modality is None:
            shared[path] = values
        else:
            by_modality.setdefault(path, {})[modality] = values
    for path, layer in routing.layers.items():
        shared.setdefault(path, layer.thresholds.tolist())
    return shared, by_modality


def _search_point(target: float, heldout: Evaluation, metric: Metric) -> dict:
    return {"target_sparsity": round(target, 6), "sparsity": heldout.sparsity, "retention": heldout.retention(metric)}


def _frontier(search: list[dict]) -> str:
    """Format the measured (sparsity, retention) points in order of sparsity, each shown once."""
    points = sorted(search, key=lambda point: point["sparsity"])
    shown = [f"({point['sparsity']:.3f}, {point['retention']:.4f})" for point in points]
    return ", ".join(dict.fromkeys(shown))


def _search_retention(run, min_retention: float, metric: Metric, floor: float, ceiling: float, search: list[dict]):
    """Bisect the sparsity target for the sparsest recipe whose held-out retention is at least `min_retention`.

    Targets range from `floor`, the lowest sparsity that --k-max allows, to `ceiling`, the highest that --k-min allows.
    """
    low, high = floor, ceiling
    best = None
    for _ in range(RETENTION_SEARCH_STEPS):
        target = 0.5 * (low + high)
        fit, drifted, measured, rounds, heldout = run(target)
        search.append(_search_point(target, heldout, metric))
        if heldout.retention(metric) >= min_retention:
            best = (target, fit, drifted, measured, rounds, heldout)
            low = target
        else:
            high = target
    if best is None:
        target = floor
        fit, drifted, measured, rounds, heldout = run(target)
        search.append(_search_point(target, heldout, metric))
        if heldout.retention(metric) < min_retention:
            fix = "lower it or raise --k-max" if floor > 0 else "lower it"
            raise InvalidInputError(
                f"--min-retention {min_retention} is unreachable: at the lowest sparsity measured, "
                f"{heldout.sparsity:.4f}, held-out {metric} retention is {heldout.retention(metric):.4f}; {fix}."
            )
        best = (target, fit, drifted, measured, rounds, heldout)
    target, fit, drifted, measured, rounds, heldout = best
    # Leave the routing on the chosen recipe, not on the last probe.
    fit, drifted, measured, rounds, heldout = run(target)
    return target, fit, drifted, measured, rounds, heldout


def _best_under_retention(run, min_retention, metric, floor, ceiling, search) -> str:
    try:
        target, _, _, _, _, heldout = _search_retention(run, min_retention, metric, floor, ceiling, search)
    except InvalidInputError:
        lowest = min(point["sparsity"] for point in search)
        return f"none (retention is below the budget even at the lowest sparsity measured, {lowest:.4f})"
    return f"sparsity {heldout.sparsity:.4f} with {metric} retention {heldout.retention(metric):.4f}"
