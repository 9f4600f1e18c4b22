"""Calibration, phase by phase: collect statistics, measure layer costs, fit with drift, measure held-out.

1. Collect gating-entropy statistics of the static model on the fitting part.
2. Measure each layer's quality cost: NLL increase per unit of dropped routing mass when that layer
   alone routes adaptively.
3. Fit thresholds (Lagrangian allocation by default), then correct for drift: run the adaptive model,
   recollect statistics (later layers now see adaptively routed hidden states), and refit until the
   measured sparsity on the fitting part is on target.
4. Measure sparsity and retention of the adaptive model on the held-out part.

With a retention budget, the sparsity target is searched by bisection on held-out retention.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gemoe_cli.calibration.data import CalibrationData
from gemoe_cli.calibration.fitting import Fit, fit_allocated, fit_uniform_quantile, max_sparsity
from gemoe_cli.calibration.retention import Evaluation, Metric, evaluate, mean_nll
from gemoe_cli.calibration.statistics import CalibrationStatistics, StatisticsCollector
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.routing import AdaptiveRouting

logger = logging.getLogger(__name__)

SPARSITY_TOLERANCE = 0.002
"""Drift correction stops once measured fit-part sparsity is this close to the target."""
MAX_DRIFT_ROUNDS = 8
COST_PROBE_BLOCKS = 32
"""Fit-part blocks used to measure each layer's quality cost (the cost only needs relative accuracy)."""
RETENTION_SEARCH_STEPS = 7
Policy = str  # "allocated" or "uniform"


@dataclass
class CalibrationResult:
    """Fitted thresholds and everything measured on the way."""

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


Progress = Callable[[str, torch.Tensor], None]


def collect_statistics(model, routing: AdaptiveRouting, batches, *, static: bool, progress: Progress | None = None):
    """Run `batches` and return (statistics, measured sparsity); with `static`, routing stays static."""
    routing.reset_counters()
    with StatisticsCollector(routing) as collector, torch.no_grad():
        for batch in batches:
            if static:
                with routing.static():
                    model(input_ids=batch.to(_device(model)), use_cache=False)
            else:
                model(input_ids=batch.to(_device(model)), use_cache=False)
            if progress is not None:
                progress("statistics", batch)
    return collector.statistics, (0.0 if static else routing.sparsity())


def _device(model) -> torch.device:
    return next(model.parameters()).device


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

    Each layer gets thresholds for `probe_sparsity` on its own while the others stay static.
    """
    batches = batches[: max(1, COST_PROBE_BLOCKS // max(1, batches[0].size(0)))]
    with routing.static():
        reference = mean_nll(model, batches)

    costs = {}
    for path, layer in routing.layers.items():
        single = CalibrationStatistics({path: statistics.layers[path]})
        probe = fit_allocated(single, min(probe_sparsity, max_sparsity(single, k_min)), k_min=k_min, k_max=k_max)
        previous_thresholds = layer.thresholds.tolist()
        others = {other: routing.layers[other].enabled for other in routing.layers}
        try:
            layer.set_thresholds(probe.thresholds[path])
            for other_path, other in routing.layers.items():
                other.enabled = other_path == path
            nll = mean_nll(model, batches)
        finally:
            layer.set_thresholds(previous_thresholds)
            for other_path, other in routing.layers.items():
                other.enabled = others[other_path]
        dropped = _predicted_dropped_mass(statistics.layers[path], probe.thresholds[path], k_min)
        costs[path] = max(nll - reference, 1e-6) / max(dropped, 1e-9)
    return costs


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
) -> tuple[Fit, CalibrationStatistics, float, int]:
    """Fit thresholds, then correct them for drift until the adaptive model's measured sparsity is on target.

    Round 1 fits on static statistics and recollects statistics from the adaptive model, whose later layers
    see adaptively routed hidden states. Later rounds refit on those drifted statistics and search the aimed
    sparsity (regula falsi on the measured sparsity) until it is within `SPARSITY_TOLERANCE` of `target`.

    Returns the fit, the statistics it was fitted on, the measured fit-part sparsity and the rounds used.
    """
    ceiling = max_sparsity(statistics, k_min)
    aim = target
    points: list[tuple[float, float]] = []  # (aim, measured) of rounds on drifted statistics
    best = None
    for round_number in range(1, MAX_DRIFT_ROUNDS + 1):
        aim = min(max(aim, 0.0), ceiling)
        if policy == "uniform":
            fit = fit_uniform_quantile(statistics, aim, k_min, k_max)
        else:
            fit = fit_allocated(statistics, aim, layer_costs, k_min, k_max)
        routing.set_thresholds(fit.thresholds)
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
    routing.set_thresholds(fit.thresholds)
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
) -> CalibrationResult:
    """Fit thresholds on `data.fit` for a sparsity and/or retention budget, measured on `data.heldout`.

    Raises:
        InvalidInputError: the budget is unreachable (the message gives the reachable frontier).
    """
    if target_sparsity is None and min_retention is None:
        raise InvalidInputError("no budget given; pass --target-sparsity, --min-retention or both.")
    fit_batches = data.batches("fit", batch_size)
    heldout_batches = data.batches("heldout", batch_size)

    static_statistics, _ = collect_statistics(model, routing, fit_batches, static=True, progress=progress)
    ceiling = max_sparsity(static_statistics, k_min)
    if target_sparsity is not None and target_sparsity > ceiling:
        raise InvalidInputError(
            f"--target-sparsity {target_sparsity} is unreachable: with --k-min {k_min} the highest sparsity is "
            f"{ceiling:.4f}; lower the target or --k-min."
        )

    probe = target_sparsity if target_sparsity is not None else 0.3
    costs = None
    if policy == "allocated":
        costs = measure_layer_costs(model, routing, static_statistics, fit_batches, probe, k_min, k_max)

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
        )
        heldout = evaluate(model, routing, heldout_batches)
        return fit, drifted, measured, rounds, heldout

    search: list[dict] = []
    if target_sparsity is not None:
        target = target_sparsity
        fit, drifted, measured, rounds, heldout = run(target)
        search.append(_search_point(target, heldout, metric))
        if min_retention is not None and heldout.retention(metric) < min_retention:
            best = _best_under_retention(run, min_retention, metric, ceiling, search)
            frontier = _frontier(search)
            raise InvalidInputError(
                f"budget unreachable: --target-sparsity {target_sparsity} gives held-out {metric} retention "
                f"{heldout.retention(metric):.4f} < --min-retention {min_retention}; the best reachable pair is "
                f"{best}; measured frontier (sparsity, retention): {frontier}."
            )
    else:
        target, fit, drifted, measured, rounds, heldout = _search_retention(run, min_retention, metric, ceiling, search)

    return CalibrationResult(
        thresholds=fit.thresholds,
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


def _search_point(target: float, heldout: Evaluation, metric: Metric) -> dict:
    return {"target_sparsity": round(target, 6), "sparsity": heldout.sparsity, "retention": heldout.retention(metric)}


def _frontier(search: list[dict]) -> str:
    points = sorted(search, key=lambda point: point["sparsity"])
    return ", ".join(f"({point['sparsity']:.3f}, {point['retention']:.4f})" for point in points)


def _search_retention(run, min_retention: float, metric: Metric, ceiling: float, search: list[dict]):
    """Bisect the sparsity target for the sparsest recipe whose held-out retention is at least `min_retention`."""
    low, high = 0.0, ceiling
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
        target = 0.0
        fit, drifted, measured, rounds, heldout = run(target)
        search.append(_search_point(target, heldout, metric))
        if heldout.retention(metric) < min_retention:
            raise InvalidInputError(
                f"--min-retention {min_retention} is unreachable even at sparsity 0 (held-out {metric} retention "
                f"{heldout.retention(metric):.4f}); lower it."
            )
        best = (target, fit, drifted, measured, rounds, heldout)
    target, fit, drifted, measured, rounds, heldout = best
    # Leave the routing on the chosen recipe, not on the last probe.
    fit, drifted, measured, rounds, heldout = run(target)
    return target, fit, drifted, measured, rounds, heldout


def _best_under_retention(run, min_retention, metric, ceiling, search) -> str:
    try:
        target, _, _, _, _, heldout = _search_retention(run, min_retention, metric, ceiling, search)
    except InvalidInputError:
        return "none (retention is below the budget even at sparsity 0)"
    return f"sparsity {heldout.sparsity:.4f} with {metric} retention {heldout.retention(metric):.4f}"
