"""The export-time routing path in eager PyTorch: same outputs as adaptive routing, and a clean restore."""

from __future__ import annotations

import pytest
import torch

from gemoe_cli.errors import InvalidInputError, UnsupportedModelError
from gemoe_cli.export.patching import THRESHOLDS_BUFFER, RoutingSpec, export_routing, ort_expert_weights
from gemoe_cli.export.torch_ops import ort_moe
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from gemoe_cli.routing.dispatch import decorated_expert_forward
from tests import tiny_models
from tests.export.conftest import FAMILIES, quantile_routing


def adaptive_logits(model, routing: RoutingSpec, ids: torch.Tensor):
    with attach_adaptive_routing(model, routing.thresholds, k_min=routing.k_min, k_max=routing.k_max) as adaptive:
        logits = tiny_models.forward_logits(model, ids)
        counters = adaptive.counters()
    return logits, [counters[path].active_pairs for path in counters]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("body", ["portable", "ort"])
def test_export_path_matches_adaptive_routing(model_type, body):
    model = tiny_models.build(model_type)
    routing = quantile_routing(model)
    ids = tiny_models.input_ids(batch=2, seq=9, seed=4)
    expected, expected_pairs = adaptive_logits(model, routing, ids)

    with export_routing(model, routing, body) as handle:
        logits = tiny_models.forward_logits(model, ids)
        pairs = handle.recorder.active_pairs().tolist()

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert pairs == expected_pairs
    assert sum(pairs) < 4 * ids.numel() * len(pairs)


# Other router and experts variants: shared experts (qwen2_moe), expert biases and a clamped gate (gpt_oss),
# undecorated experts (dbrx), bias on logits (kolibri1), bias passed as an argument (hy_v3), probabilities
# scoring (gemma4).
VARIANT_FAMILIES = ("qwen2_moe", "gpt_oss", "dbrx", "kolibri1", "hy_v3", "gemma4", "glm4_moe", "deepseek_v2")


@pytest.mark.parametrize("model_type", VARIANT_FAMILIES)
def test_portable_path_matches_other_families(model_type):
    model = tiny_models.build(model_type)
    routing = quantile_routing(model)
    ids = tiny_models.input_ids(batch=2, seq=9, seed=4)
    expected, expected_pairs = adaptive_logits(model, routing, ids)

    with export_routing(model, routing, "portable") as handle:
        logits = tiny_models.forward_logits(model, ids)
        pairs = handle.recorder.active_pairs().tolist()

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert pairs == expected_pairs


def test_export_routing_restores_model():
    model = tiny_models.build("deepseek_v3")
    blocks = find_moe_blocks(model)
    buffers_before = {name for name, _ in model.named_buffers()}
    hooks_before = [len(block.router._forward_hooks) for block in blocks]
    ids = tiny_models.input_ids(batch=1, seq=5)
    before = tiny_models.forward_logits(model, ids)

    with export_routing(model, quantile_routing(model), "ort"):
        assert all(hasattr(block.block, THRESHOLDS_BUFFER) for block in blocks)

    assert {name for name, _ in model.named_buffers()} == buffers_before
    assert [len(block.router._forward_hooks) for block in blocks] == hooks_before
    assert all("forward" not in vars(block.experts) for block in blocks)
    torch.testing.assert_close(tiny_models.forward_logits(model, ids), before, rtol=0, atol=0)


def test_export_routing_restores_after_error():
    model = tiny_models.build("mixtral")
    block = find_moe_blocks(model)[0]

    with pytest.raises(RuntimeError, match="inside"), export_routing(model, RoutingSpec(), "portable"):
        raise RuntimeError("failure inside the export")

    assert "forward" not in vars(block.experts)
    assert not hasattr(block.block, THRESHOLDS_BUFFER)


def test_ort_weight_layout_matches_experts():
    model = tiny_models.build("qwen3_moe")
    experts = find_moe_blocks(model)[0].experts
    weights = ort_expert_weights(experts)
    hidden = torch.randn(6, experts.gate_up_proj.shape[-1])
    router_input = torch.full((6, 8), -1.0e4)
    router_input[:, 5] = 0.0  # every token to expert 5 with weight 1

    output = ort_moe(hidden, router_input, weights["gemoe_fc1_weights"], None, weights["gemoe_fc2_weights"], None, 1)

    torch.testing.assert_close(output, decorated_expert_forward(experts, 5, hidden), rtol=1e-5, atol=1e-6)


def test_ort_body_rejects_custom_gate():
    model = tiny_models.build("gpt_oss")

    with pytest.raises(UnsupportedModelError, match="use --body portable"), export_routing(model, RoutingSpec(), "ort"):
        pass


def test_thresholds_must_fit_bounds():
    model = tiny_models.build("olmoe")
    path = find_moe_blocks(model)[0].path

    with (
        pytest.raises(InvalidInputError, match="non-decreasing"),
        export_routing(model, RoutingSpec(thresholds={path: [1.0, 0.5, 2.0]}), "portable"),
    ):
        pass


def test_unknown_layer_path_rejected():
    model = tiny_models.build("olmoe")

    with (
        pytest.raises(InvalidInputError, match="'model.layers.9.mlp', which is not a MoE block"),
        export_routing(model, RoutingSpec(thresholds={"model.layers.9.mlp": [0.1, 0.2, 0.3]}), "portable"),
    ):
        pass


def test_k_max_above_top_k_rejected():
    model = tiny_models.build("olmoe")

    with (
        pytest.raises(InvalidInputError, match="k_max=5 is greater than the static top-k K=4"),
        export_routing(model, RoutingSpec(k_max=5), "portable"),
    ):
        pass
