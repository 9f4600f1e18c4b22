import math

import numpy as np
import pytest
import torch

from gemoe_cli.calibration.statistics import (
    CalibrationStatistics,
    LayerStatistics,
    StatisticsCollector,
    dropped_mass_per_k,
)
from gemoe_cli.routing import attach_adaptive_routing
from tests import tiny_models


def test_dropped_mass_hand_values():
    ranks = torch.tensor([[1, 0, 2]])  # slot 1 is best, then slot 0, then slot 2
    weights = torch.tensor([[0.3, 0.5, 0.2]])

    dropped = dropped_mass_per_k(ranks, weights)

    assert torch.allclose(dropped, torch.tensor([[1.0, 0.5, 0.2, 0.0]]))


def test_quantile_within_one_bin():
    layer = LayerStatistics("layer", num_experts=16, top_k=4, num_bins=256)
    entropy = np.random.default_rng(0).uniform(0.5, 2.5, size=10_000)
    layer.add(entropy, np.zeros((entropy.size, 5)))

    for level in (0.1, 0.5, 0.9):
        assert abs(layer.quantile(level) - np.quantile(entropy, level)) <= layer.bin_width + 1e-9


def test_out_of_range_entropy_goes_to_end_bins():
    layer = LayerStatistics("layer", num_experts=4, top_k=2, num_bins=8)

    layer.add(np.array([-1.0, 0.0, math.log(4), 99.0]), np.zeros((4, 3)))

    assert layer.counts[0] == 2
    assert layer.counts[-1] == 2


def test_merge_of_halves_is_exact():
    rng = np.random.default_rng(1)
    entropy = rng.uniform(0, math.log(8), size=5000)
    dropped = rng.uniform(0, 1, size=(5000, 5))
    whole = LayerStatistics("layer", 8, 4)
    first = LayerStatistics("layer", 8, 4)
    second = LayerStatistics("layer", 8, 4)

    whole.add(entropy, dropped, nonfinite=3)
    first.add(entropy[:2000], dropped[:2000], nonfinite=1)
    second.add(entropy[2000:], dropped[2000:], nonfinite=2)
    merged = first.merge(second)

    assert np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.dropped_mass, whole.dropped_mass)
    assert merged.nonfinite_tokens == whole.nonfinite_tokens


def test_merge_rejects_other_layer():
    with pytest.raises(ValueError, match="cannot merge statistics of a with statistics of b"):
        LayerStatistics("a", 8, 4).merge(LayerStatistics("b", 8, 4))


def test_json_round_trip():
    layer = LayerStatistics("layer", 8, 2, num_bins=64)
    layer.add(np.array([0.1, 0.2, 1.9]), np.array([[1, 0.3, 0], [1, 0.5, 0], [1, 0.1, 0]]))
    statistics = CalibrationStatistics({"layer": layer})

    restored = CalibrationStatistics.from_json(statistics.to_json()).layers["layer"]

    assert np.array_equal(restored.counts, layer.counts)
    assert np.array_equal(restored.dropped_mass, layer.dropped_mass)


def test_collected_halves_merge_to_whole_run():
    model = tiny_models.build("qwen3_moe")
    batches = [tiny_models.input_ids(batch=2, seq=16, seed=seed) for seed in range(4)]

    def collect(selected):
        with attach_adaptive_routing(model, {}) as routing, StatisticsCollector(routing) as collector:
            with torch.no_grad():
                for batch in selected:
                    tiny_models.forward_logits(model, batch)
        return collector.statistics

    whole = collect(batches)
    merged = collect(batches[:2]).merge(collect(batches[2:]))

    for path, layer in whole.layers.items():
        assert layer.tokens == 4 * 2 * 16
        assert np.array_equal(merged.layers[path].counts, layer.counts)
        assert np.array_equal(merged.layers[path].dropped_mass, layer.dropped_mass)
