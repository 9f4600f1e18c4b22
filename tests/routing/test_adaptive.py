import math

import pytest
import torch

from gemoe_cli.routing import attach_adaptive_routing, dispatch, find_moe_blocks, gating_distribution, gating_entropy
from tests import tiny_models


@pytest.fixture
def mixtral():
    return tiny_models.build("mixtral")


def _thresholds(model, values):
    return {block.path: list(values) for block in find_moe_blocks(model)}


def _median_entropy_thresholds(model, ids):
    """Thresholds at the 25/50/75% entropy quantiles of each layer, so every k from 1 to 4 occurs."""
    captured = {}
    handles = []
    for block in find_moe_blocks(model):

        def hook(module, args, output, path=block.path):
            captured[path] = gating_entropy(gating_distribution(output[0], "softmax"))

        handles.append(block.router.register_forward_hook(hook))
    with torch.no_grad():
        tiny_models.forward_logits(model, ids)
    for handle in handles:
        handle.remove()
    quantiles = torch.tensor([0.25, 0.5, 0.75])
    return {path: torch.quantile(entropy, quantiles).tolist() for path, entropy in captured.items()}, captured


def test_counters_match_independent_count(mixtral):
    ids = tiny_models.input_ids(batch=4, seq=16)
    thresholds, entropies = _median_entropy_thresholds(mixtral, ids)

    with attach_adaptive_routing(mixtral, thresholds) as routing, torch.no_grad():
        tiny_models.forward_logits(mixtral, ids)
        counters = routing.counters()
        sparsity = routing.sparsity()

    # Layer 0 sees the same hidden states in both runs, so its k follows directly from the static entropies.
    first = find_moe_blocks(mixtral)[0].path
    expected_k = 1 + (entropies[first].unsqueeze(-1) > torch.tensor(thresholds[first])).sum(-1)
    assert counters[first].tokens == ids.numel()
    assert counters[first].k_histogram == torch.bincount(expected_k, minlength=5).tolist()
    assert counters[first].active_pairs == int(expected_k.sum())
    total_pairs = sum(c.active_pairs for c in counters.values())
    total_tokens = sum(c.tokens for c in counters.values())
    assert sparsity == pytest.approx(1 - total_pairs / (4 * total_tokens))
    assert 0.2 < sparsity < 0.6


def test_dropped_experts_are_not_computed(mixtral, monkeypatch):
    ids = tiny_models.input_ids(batch=2, seq=16)
    thresholds, _ = _median_entropy_thresholds(mixtral, ids)
    rows_computed = []
    original = dispatch.decorated_expert_forward

    def counting_forward(experts, expert_id, inputs):
        rows_computed.append(inputs.shape[0])
        return original(experts, expert_id, inputs)

    monkeypatch.setattr(dispatch, "decorated_expert_forward", counting_forward)
    with attach_adaptive_routing(mixtral, thresholds) as routing, torch.no_grad():
        tiny_models.forward_logits(mixtral, ids)
        active_pairs = sum(c.active_pairs for c in routing.counters().values())

    assert sum(rows_computed) == active_pairs
    assert active_pairs < 4 * ids.numel() * len(thresholds)


def test_sparse_dispatch_matches_weight_zero_fallback(mixtral):
    ids = tiny_models.input_ids()
    thresholds, _ = _median_entropy_thresholds(mixtral, ids)

    outputs = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        mixtral.set_experts_implementation(implementation)
        with attach_adaptive_routing(mixtral, thresholds, sparse_dispatch=False), torch.no_grad():
            outputs[implementation] = tiny_models.forward_logits(mixtral, ids)
    with attach_adaptive_routing(mixtral, thresholds), torch.no_grad():
        sparse = tiny_models.forward_logits(mixtral, ids)

    for implementation, logits in outputs.items():
        assert torch.isfinite(logits).all(), implementation
        assert (logits - sparse).abs().max().item() <= 1e-5, implementation


def test_remove_restores_model(mixtral):
    ids = tiny_models.input_ids()
    with torch.no_grad():
        reference = tiny_models.forward_logits(mixtral, ids)
    before = mixtral.get_experts_implementation()

    with attach_adaptive_routing(mixtral, _thresholds(mixtral, [math.inf] * 3)), torch.no_grad():
        changed = tiny_models.forward_logits(mixtral, ids)

    with torch.no_grad():
        after = tiny_models.forward_logits(mixtral, ids)
    assert (changed - reference).abs().max() > 1e-3
    assert torch.equal(after, reference)
    assert mixtral.get_experts_implementation() == before
    assert not any(block.router._forward_hooks for block in find_moe_blocks(mixtral))
    assert not any(block.experts._forward_pre_hooks for block in find_moe_blocks(mixtral))


def test_nonfinite_router_logits_get_k_max_without_nan(mixtral):
    ids = tiny_models.input_ids(batch=1, seq=5)
    block = find_moe_blocks(mixtral)[0]

    def poison(module, args, output):
        logits, weights, index = output
        logits = logits.clone()
        logits[0, 0] = float("nan")
        logits[1, 0] = float("inf")
        return logits, weights, index

    handle = block.router.register_forward_hook(poison)
    try:
        with attach_adaptive_routing(mixtral, _thresholds(mixtral, [math.inf] * 3)) as routing, torch.no_grad():
            logits = tiny_models.forward_logits(mixtral, ids)
            counters = routing.counters()[block.path]
    finally:
        handle.remove()

    assert torch.isfinite(logits).all()
    assert counters.nonfinite_tokens == 2
    assert counters.k_histogram[4] == 2
    assert counters.k_histogram[1] == 3


def test_observer_sees_each_layer(mixtral):
    events = []
    with attach_adaptive_routing(mixtral, {}) as routing, torch.no_grad():
        for layer in routing.layers.values():
            layer.observers.append(events.append)
        tiny_models.forward_logits(mixtral, tiny_models.input_ids())

    assert [event.path for event in events] == list(routing.layers)
    assert all(event.entropy.shape == (14,) for event in events)


def test_unknown_layer_path_rejected(mixtral):
    with pytest.raises(ValueError, match="'model.layers.9.mlp' is not a MoE block"):
        attach_adaptive_routing(mixtral, {"model.layers.9.mlp": [0.0, 0.0, 0.0]})


def test_k_max_above_top_k_rejected(mixtral):
    with pytest.raises(ValueError, match="k_max=5 is greater than the static top-k K=4"):
        attach_adaptive_routing(mixtral, {}, k_max=5)


def test_baselines_choose_k_from_ranked_probabilities():
    from gemoe_cli.routing.baselines import RatioSkip, StaticK, TopP

    ranked = torch.tensor([[0.5, 0.3, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2]])

    assert TopP(0.75).experts_per_token(ranked, 1, 4).tolist() == [2, 4]
    assert TopP(0.1).experts_per_token(ranked, 1, 4).tolist() == [1, 1]
    assert RatioSkip(0.5).experts_per_token(ranked, 1, 4).tolist() == [2, 4]
    assert StaticK(3).experts_per_token(ranked, 1, 4).tolist() == [3, 3]


def test_static_k_minus_one_baseline_counts(mixtral):
    from gemoe_cli.routing.baselines import StaticK

    ids = tiny_models.input_ids()
    with attach_adaptive_routing(mixtral, {}) as routing, torch.no_grad():
        for layer in routing.layers.values():
            layer.baseline = StaticK(3)
        tiny_models.forward_logits(mixtral, ids)

    assert routing.sparsity() == pytest.approx(0.25)
