import math

import numpy as np
import pytest

from gemoe_cli.calibration.fitting import (
    fit_allocated,
    fit_uniform_quantile,
    max_sparsity,
    min_sparsity,
    thresholds_from_bin_k,
)
from gemoe_cli.calibration.statistics import CalibrationStatistics, LayerStatistics


def _layer(path, entropy_low, entropy_high, seed, tokens=20_000, experts=16, top_k=4):
    rng = np.random.default_rng(seed)
    entropy = rng.uniform(entropy_low, entropy_high, size=tokens)
    # Uncertain tokens spread their weight: the mass dropped at k grows with entropy.
    spread = (entropy / math.log(experts))[:, None]
    k = np.arange(top_k + 1)[None, :]
    dropped = np.clip(1 - k / top_k, 0, 1) * (0.2 + 0.8 * spread)
    dropped[:, 0] = 1.0
    layer = LayerStatistics(path, experts, top_k)
    layer.add(entropy, dropped)
    return layer


def _statistics():
    return CalibrationStatistics(
        {"a": _layer("a", 0.2, 1.5, seed=0), "b": _layer("b", 1.0, 2.7, seed=1)}
    )


def _measured_sparsity(statistics, thresholds, k_min=1):
    active = total = 0
    for path, layer in statistics.layers.items():
        centers = layer.bin_edges()[:-1] + layer.bin_width / 2
        k = k_min + (centers[:, None] > np.array(thresholds[path])[None, :]).sum(axis=1)
        active += (k * layer.counts).sum()
        total += layer.top_k * layer.tokens
    return 1 - active / total


def test_thresholds_from_bin_k_places_edges():
    layer = LayerStatistics("a", 4, 3, num_bins=4)
    bin_k = np.array([1, 1, 2, 3])

    thresholds = thresholds_from_bin_k(layer, bin_k, k_min=1, k_max=3)

    edges = layer.bin_edges()
    assert thresholds[0] == pytest.approx(edges[2], abs=layer.bin_width * 0.01)
    assert thresholds[0] < edges[2]
    assert thresholds[1] == pytest.approx(edges[3], abs=layer.bin_width * 0.01)


def test_thresholds_infinite_at_extremes():
    layer = LayerStatistics("a", 4, 3, num_bins=4)

    assert thresholds_from_bin_k(layer, np.array([3, 3, 3, 3]), 1, 3) == [-math.inf, -math.inf]
    assert thresholds_from_bin_k(layer, np.array([1, 1, 1, 1]), 1, 3) == [math.inf, math.inf]


@pytest.mark.parametrize("fit", [fit_uniform_quantile, fit_allocated])
@pytest.mark.parametrize("target", [0.1, 0.365, 0.6])
def test_fit_hits_target_sparsity(fit, target):
    statistics = _statistics()

    result = fit(statistics, target)

    assert result.predicted_sparsity == pytest.approx(target, abs=0.005)
    assert _measured_sparsity(statistics, result.thresholds) == pytest.approx(target, abs=0.005)
    for values in result.thresholds.values():
        assert values == sorted(values)


def test_allocation_prefers_cheap_layer():
    statistics = _statistics()

    result = fit_allocated(statistics, 0.3, layer_costs={"a": 10.0, "b": 0.1})
    single = {path: CalibrationStatistics({path: layer}) for path, layer in statistics.layers.items()}

    sparsity_a = _measured_sparsity(single["a"], {"a": result.thresholds["a"]})
    sparsity_b = _measured_sparsity(single["b"], {"b": result.thresholds["b"]})
    assert sparsity_b > sparsity_a


def test_allocation_drops_less_mass_than_uniform():
    statistics = _statistics()

    def dropped(thresholds):
        total = 0.0
        for path, layer in statistics.layers.items():
            centers = layer.bin_edges()[:-1] + layer.bin_width / 2
            k = 1 + (centers[:, None] > np.array(thresholds[path])[None, :]).sum(axis=1)
            total += (layer.mean_dropped_mass()[np.arange(len(k)), k] * layer.counts).sum()
        return total

    uniform = fit_uniform_quantile(statistics, 0.4)
    allocated = fit_allocated(statistics, 0.4)

    assert allocated.predicted_sparsity == pytest.approx(uniform.predicted_sparsity, abs=0.005)
    assert dropped(allocated.thresholds) < dropped(uniform.thresholds)


def test_k_min_bounds_max_sparsity():
    statistics = _statistics()

    assert max_sparsity(statistics, k_min=1) == pytest.approx(0.75)
    assert max_sparsity(statistics, k_min=2) == pytest.approx(0.5)


def test_k_max_bounds_min_sparsity():
    statistics = _statistics()

    assert min_sparsity(statistics) == pytest.approx(0.0)
    assert min_sparsity(statistics, k_max=4) == pytest.approx(0.0)
    assert min_sparsity(statistics, k_max=3) == pytest.approx(0.25)
    assert min_sparsity(statistics, k_max=1) == pytest.approx(0.75)


def test_frontier_lists_each_point_once():
    from gemoe_cli.calibration.calibrate import _frontier

    search = [
        {"target_sparsity": 0.3, "sparsity": 0.30001, "retention": 0.99},
        {"target_sparsity": 0.0, "sparsity": 0.022, "retention": 0.999},
        {"target_sparsity": 0.0, "sparsity": 0.022, "retention": 0.999},
    ]

    assert _frontier(search) == "(0.022, 0.9990), (0.300, 0.9900)"


def test_target_outside_range_rejected():
    with pytest.raises(ValueError, match="outside"):
        fit_allocated(_statistics(), 1.5)


def test_constant_entropy_layer_does_not_break_fitting():
    layer = LayerStatistics("flat", 8, 4)
    layer.add(np.full(1000, 1.0), np.tile([1.0, 0.6, 0.3, 0.1, 0.0], (1000, 1)))
    statistics = CalibrationStatistics({"flat": layer})

    result = fit_allocated(statistics, 0.3)

    assert all(not math.isnan(value) for value in result.thresholds["flat"])
