"""The EntropyAdaptiveRouter function body in onnxruntime against the PyTorch op, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, defs, helper

from gemoe_cli.export import ops, torch_ops

VARIANTS = [
    ops.RouterVariant(scoring, renormalize, has_bias, bias_on_logits)
    for scoring in ops.SCORINGS
    for renormalize in ops.RENORMALIZATIONS
    for has_bias, bias_on_logits in ((False, False), (True, False), (True, True))
]
BOUNDS = [(1, 4), (2, 3), (1, 1), (4, 4)]  # (k_min, k_max) with static K = 4


def router_model(variant: ops.RouterVariant, k_min: int, k_max: int) -> onnx.ModelProto:
    """Build a model with one EntropyAdaptiveRouter node and its function body, nothing else."""
    inputs = ["router_logits", "thresholds", "top_k_index", "top_k_weights"]
    if variant.has_bias:
        inputs.append("selection_bias")
    node = helper.make_node(
        ops.ROUTER_OP,
        inputs,
        ["weights", "index", "k"],
        domain=ops.DOMAIN,
        k_min=k_min,
        k_max=k_max,
        scoring=variant.scoring,
        renormalize=variant.renormalize,
        bias_on_logits=int(variant.bias_on_logits),
    )
    node.overload = variant.overload
    value = helper.make_tensor_value_info
    graph_inputs = [
        value("router_logits", TensorProto.FLOAT, ["T", "E"]),
        value("thresholds", TensorProto.FLOAT, ["N"]),
        value("top_k_index", TensorProto.INT64, ["T", "K"]),
        value("top_k_weights", TensorProto.FLOAT, ["T", "K"]),
    ]
    if variant.has_bias:
        graph_inputs.append(value("selection_bias", TensorProto.FLOAT, ["E"]))
    graph_outputs = [
        value("weights", TensorProto.FLOAT, ["T", "M"]),
        value("index", TensorProto.INT64, ["T", "M"]),
        value("k", TensorProto.INT64, ["T"]),
    ]
    graph = helper.make_graph([node], "router", graph_inputs, graph_outputs)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ops.ONNX_OPSET), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)],
        functions=[ops.router_function(variant)],
        ir_version=ops.MIN_IR_VERSION,
    )


def router_inputs(variant: ops.RouterVariant, k_min: int, k_max: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random router outputs with a NaN row, an inf logit, a uniform row (ties) and a static top-4 selection."""
    generator = torch.Generator().manual_seed(seed)
    tokens, experts = 48, 8
    if variant.scoring == "probabilities":
        logits = torch.softmax(torch.randn(tokens, experts, generator=generator) * 2, dim=-1)
    else:
        logits = torch.randn(tokens, experts, generator=generator) * 2
        logits[5, 2] = math.inf
    logits[3, 1] = math.nan
    logits[7] = 0.25
    selection = torch.topk(torch.nan_to_num(logits, posinf=1e4), 4)
    weights = torch.softmax(torch.nan_to_num(logits, posinf=1e4), dim=-1).gather(-1, selection.indices)
    thresholds = torch.sort(torch.rand(k_max - k_min, generator=generator) * 2).values
    if k_max - k_min >= 2:
        thresholds[0] = -math.inf
    values = {
        "router_logits": logits,
        "thresholds": thresholds,
        "top_k_index": selection.indices,
        "top_k_weights": weights,
    }
    if variant.has_bias:
        values["selection_bias"] = torch.randn(experts, generator=generator) * 0.1
    return values


def run_body(variant, k_min, k_max, values):
    model = router_model(variant, k_min, k_max)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: tensor.numpy() for name, tensor in values.items()})


def run_torch_op(variant, k_min, k_max, values):
    return torch_ops.entropy_adaptive_router(
        values["router_logits"],
        values["thresholds"],
        values["top_k_index"],
        values["top_k_weights"],
        values.get("selection_bias"),
        k_min,
        k_max,
        variant.scoring,
        variant.renormalize,
        variant.bias_on_logits,
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.overload)
@pytest.mark.parametrize(("k_min", "k_max"), BOUNDS)
def test_body_matches_torch_op(variant, k_min, k_max):
    values = router_inputs(variant, k_min, k_max)

    weights, index, k = run_body(variant, k_min, k_max, values)
    expected_weights, expected_index, expected_k = run_torch_op(variant, k_min, k_max, values)

    np.testing.assert_array_equal(k, expected_k.numpy())
    np.testing.assert_array_equal(index, expected_index.numpy())
    np.testing.assert_allclose(weights, expected_weights.numpy(), rtol=0, atol=1e-6)


def test_nonfinite_row_gets_k_max():
    variant = ops.RouterVariant("softmax", "preserve_mass", has_bias=False)
    values = router_inputs(variant, 1, 4)
    values["thresholds"] = torch.tensor([math.inf, math.inf, math.inf])

    _, index, k = run_body(variant, 1, 4, values)

    assert k[3] == 4  # NaN logit
    assert k[5] == 4  # inf logit
    assert k[0] == 1
    assert (index[0, 1:] == 8).all()


def test_dropped_slots_are_sentinel_with_zero_weight():
    variant = ops.RouterVariant("softmax", "none", has_bias=False)
    values = router_inputs(variant, 1, 4)

    weights, index, k = run_body(variant, 1, 4, values)

    slots = np.arange(4)[None, :]
    dropped = slots >= k[:, None]
    assert dropped.any()
    assert (index[dropped] == 8).all()
    assert (weights[dropped] == 0).all()
    assert (index[~dropped] < 8).all()


def test_preserve_mass_keeps_weight_sum():
    variant = ops.RouterVariant("softmax", "preserve_mass", has_bias=False)
    values = router_inputs(variant, 1, 4)

    weights, _, _ = run_body(variant, 1, 4, values)

    finite_rows = np.isfinite(values["router_logits"].numpy()).all(axis=-1)
    expected = values["top_k_weights"].sum(-1).numpy()
    np.testing.assert_allclose(weights.sum(-1)[finite_rows], expected[finite_rows], rtol=1e-6)


def test_all_minus_inf_thresholds_keep_static_selection():
    variant = ops.RouterVariant("softmax", "preserve_mass", has_bias=False)
    values = router_inputs(variant, 1, 4)
    values["thresholds"] = torch.full((3,), -math.inf)

    weights, index, k = run_body(variant, 1, 4, values)

    assert (k == 4).all()
    # Slots come back in rank order: descending logit, ties in slot order.
    static_index = values["top_k_index"].numpy()
    slot_logits = np.take_along_axis(values["router_logits"].numpy(), static_index, axis=-1)
    order = np.argsort(-slot_logits, axis=-1, kind="stable")
    finite = np.isfinite(values["router_logits"].numpy()).all(axis=-1)
    np.testing.assert_array_equal(index[finite], np.take_along_axis(static_index, order, axis=-1)[finite])
    np.testing.assert_allclose(weights.sum(-1), values["top_k_weights"].sum(-1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=lambda variant: variant.overload)
def test_checker_accepts_body_without_schema(variant):
    assert not defs.has(ops.ROUTER_OP, ops.DOMAIN)

    onnx.checker.check_model(router_model(variant, 1, 4), full_check=True)


def test_function_body_uses_standard_ops_only():
    for variant in VARIANTS:
        function = ops.router_function(variant)

        assert {node.domain for node in function.node} == {""}
        assert [(o.domain, o.version) for o in function.opset_import] == [("", ops.ONNX_OPSET)]
        assert function.overload == variant.overload


def test_registered_schemas_are_removed_on_exit():
    with ops.registered_schemas(include_ort_moe=True):
        assert defs.has(ops.ROUTER_OP, ops.DOMAIN)
        assert defs.has(ops.ORT_MOE_OP, ops.MICROSOFT_DOMAIN)

    assert not defs.has(ops.ROUTER_OP, ops.DOMAIN)
    assert not defs.has(ops.ORT_MOE_OP, ops.MICROSOFT_DOMAIN)


def test_unknown_scoring_rejected():
    with pytest.raises(ValueError, match="not exportable"):
        ops.RouterVariant("tanh", "preserve_mass", has_bias=False)
