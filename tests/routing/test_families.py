"""Parity of adaptive routing with the original model, for every family in the tiny model zoo."""

import math

import pytest
import torch

from gemoe_cli.errors import UnsupportedModelError
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from gemoe_cli.routing.families import adapter_for
from tests import tiny_models

SUPPORTED = sorted(t for t, spec in tiny_models.FAMILIES.items() if spec.expected_supported)
UNSUPPORTED = sorted(t for t, spec in tiny_models.FAMILIES.items() if not spec.expected_supported)
TRANSFORMERS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
TOLERANCE = 1e-5


def _implementations(model):
    decorated = all(hasattr(block.experts, "has_gate") for block in find_moe_blocks(model))
    return TRANSFORMERS_IMPLEMENTATIONS if decorated else (None,)


def _forward(model, ids):
    with torch.no_grad():
        return tiny_models.forward_logits(model, ids)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _quantile_thresholds(model, ids, k_min=1):
    """Per-layer thresholds at evenly spaced quantiles of static gating entropy, so several k values occur."""
    events = {}
    with attach_adaptive_routing(model, {}, sparse_dispatch=False) as routing:
        for layer in routing.layers.values():
            layer.observers.append(lambda event: events.setdefault(event.path, event.entropy))
        _forward(model, ids)
        layers = dict(routing.layers)
    thresholds = {}
    for path, layer in layers.items():
        if path not in events:
            continue  # a block that saw no tokens (a vision expert block on text input) keeps static routing
        count = layer.k_max - k_min
        quantiles = torch.linspace(0, 1, count + 2)[1:-1]
        thresholds[path] = torch.quantile(events[path].float(), quantiles).tolist()
    return thresholds


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_static_thresholds_match_original(model_type):
    model = tiny_models.build(model_type)
    ids = tiny_models.input_ids()

    for implementation in _implementations(model):
        if implementation is not None:
            model.set_experts_implementation(implementation)
        reference = _forward(model, ids)

        with attach_adaptive_routing(model, {}, sparse_dispatch=False):
            same_dispatch = _forward(model, ids)
        with attach_adaptive_routing(model, {}):
            sparse_dispatch = _forward(model, ids)

        assert _max_diff(same_dispatch, reference) <= TOLERANCE, implementation
        assert _max_diff(sparse_dispatch, reference) <= TOLERANCE, implementation


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_adaptive_outputs_agree_and_are_finite(model_type):
    model = tiny_models.build(model_type)
    ids = tiny_models.input_ids(batch=2, seq=12)
    thresholds = _quantile_thresholds(model, ids)

    with attach_adaptive_routing(model, thresholds) as routing:
        sparse = _forward(model, ids)
        sparsity = routing.sparsity()
    assert torch.isfinite(sparse).all()
    assert sparsity > 0.1

    for implementation in _implementations(model):
        if implementation is not None:
            model.set_experts_implementation(implementation)
        with attach_adaptive_routing(model, thresholds, sparse_dispatch=False):
            other = _forward(model, ids)
        assert torch.isfinite(other).all(), implementation
        assert _max_diff(other, sparse) <= TOLERANCE, implementation


# Softmax routers that never renormalise their top-k weights, so dropping a slot is not the same as top-(K-1).
NOT_RENORMALISED = {"jamba", "deepseek_v2", "deepseek_ocr2", "unlimited_ocr"}


def _renormalised_softmax_families():
    families = []
    for model_type in sorted(set(SUPPORTED) - NOT_RENORMALISED):
        adapter = adapter_for(model_type)
        if adapter.scoring == "softmax" and tiny_models.FAMILIES[model_type].top_k_attr is not None:
            families.append(model_type)
    return families


@pytest.mark.parametrize("model_type", _renormalised_softmax_families())
def test_k_minus_one_equals_smaller_top_k(model_type):
    spec = tiny_models.FAMILIES[model_type]
    top_k = spec.default_top_k
    full = tiny_models.build(model_type, renormalize=True)
    smaller = tiny_models.build(model_type, top_k=top_k - 1, renormalize=True)
    ids = tiny_models.input_ids()
    for (name, a), (_, b) in zip(full.state_dict().items(), smaller.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    thresholds = {block.path: [math.inf] for block in find_moe_blocks(full)}
    with attach_adaptive_routing(full, thresholds, k_min=top_k - 1, k_max=top_k) as routing:
        adaptive = _forward(full, ids)
        sparsity = routing.sparsity()

    assert sparsity == pytest.approx(1 / top_k)
    assert _max_diff(adaptive, _forward(smaller, ids)) <= TOLERANCE


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_family_rejected_with_reason(model_type):
    model = tiny_models.build(model_type)

    with pytest.raises(UnsupportedModelError, match="not supported: "):
        attach_adaptive_routing(model, {})
