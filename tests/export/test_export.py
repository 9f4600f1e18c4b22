"""Exported tiny models: checker, custom nodes with bodies, onnxruntime parity, sparsity counts, generation."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

from gemoe_cli.cli.app import app
from gemoe_cli.errors import RuntimeFailureError
from gemoe_cli.export import decoder, ops
from gemoe_cli.export.generate import greedy_generate
from gemoe_cli.export.onnx_export import export_onnx, routing_from_checkpoint
from gemoe_cli.export.patching import RoutingSpec
from gemoe_cli.export.validate import DEFAULT_CASES, session_feeds, validate_export
from gemoe_cli.recipe import load_recipe
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from tests import tiny_models, tiny_vlms
from tests.export.conftest import FAMILIES

EOS = 2


@pytest.mark.parametrize("model_type", FAMILIES)
def test_graph_has_router_nodes_with_bodies(model_type, exported):
    export = exported(model_type)
    proto = onnx.load(export.path)

    onnx.checker.check_model(proto, full_check=True)
    routers = ops.custom_nodes(proto)
    assert len(routers) == len(find_moe_blocks(export.model))
    assert {node.op_type for node in routers} == {ops.ROUTER_OP}
    functions = {(function.domain, function.name, function.overload) for function in proto.functions}
    assert all((node.domain, node.op_type, node.overload) in functions for node in routers)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 18), (ops.DOMAIN, 1)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_node_survives_optimizer(model_type, exported):
    import onnxscript.optimizer

    proto = onnx.load(exported(model_type).path)
    # inline=False: with inlining on, the optimizer replaces every model-local function call by its body.
    optimized = onnxscript.optimizer.optimize(proto, inline=False)

    assert len(ops.custom_nodes(optimized)) == len(ops.custom_nodes(proto))
    assert len(optimized.functions) == len(proto.functions)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_onnxruntime_matches_pytorch(model_type, exported):
    export = exported(model_type)

    report = validate_export(export.path, export.model, export.routing)

    assert report.errors == []
    assert set(report.checks) == set(export.graph["outputs"])
    for check in report.checks.values():
        assert check.max_abs_diff <= 1e-4, f"{check.name}: {check.max_abs_diff} in {check.case}"
    assert report.checks[decoder.EXPERT_ACTIVATIONS].max_abs_diff == 0
    assert len(report.cases) == len(DEFAULT_CASES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_activation_counts_match_routing_counters(model_type, exported):
    export = exported(model_type)
    session = onnxruntime.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    layout = decoder.cache_layout(export.model)
    ids = tiny_models.input_ids(batch=3, seq=11, seed=9)
    routing = export.routing

    with attach_adaptive_routing(export.model, routing.thresholds) as adaptive:
        tiny_models.forward_logits(export.model, ids)
        expected = [counters.active_pairs for counters in adaptive.counters().values()]
    outputs = session.run(
        [decoder.EXPERT_ACTIVATIONS], session_feeds(session, *decoder.step_inputs(ids, layout.empty_past(3)))
    )

    assert outputs[0].tolist() == expected
    tokens = ids.numel()
    assert all(tokens <= pairs < 4 * tokens for pairs in expected)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_matches_pytorch(model_type, exported):
    export = exported(model_type)
    ids = tiny_models.input_ids(batch=2, seq=6, seed=12)
    mask = torch.ones_like(ids)
    ids[1, :2] = EOS  # left padding
    mask[1, :2] = 0

    tokens = greedy_generate(export.path, ids.numpy(), 10, attention_mask=mask.numpy(), eos_token_id=EOS)
    with attach_adaptive_routing(export.model, export.routing.thresholds), torch.no_grad():
        expected = export.model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=EOS
        )

    np.testing.assert_array_equal(tokens, expected.numpy())


def test_ort_body_uses_microsoft_moe(exported):
    export = exported("mixtral", "ort")
    proto = onnx.load(export.path)

    moe_nodes = [node for node in proto.graph.node if (node.domain, node.op_type) == ("com.microsoft", "MoE")]
    assert len(moe_nodes) == len(find_moe_blocks(export.model))
    assert len(ops.custom_nodes(proto)) == len(moe_nodes)
    report = validate_export(export.path, export.model, export.routing)
    assert report.passed, report.failures


def test_validation_collects_every_failure(exported):
    export = exported("olmoe")

    report = validate_export(export.path, export.model, export.routing, atol=1e-12)

    assert not report.passed
    failed = [check.name for check in report.checks.values() if not check.passed]
    assert decoder.LOGITS in failed
    assert len(report.failures) == len(failed)
    assert any(line.startswith("✗ logits") for line in report.lines())
    with pytest.raises(RuntimeFailureError, match=r"ONNX validation failed .*\(\d+ problems\): logits"):
        report.raise_for_failures()


def test_generation_stops_when_every_row_finished(exported):
    export = exported("olmoe")
    ids = tiny_models.input_ids(batch=1, seq=4, seed=2)
    first = greedy_generate(export.path, ids.numpy(), 1)[0, -1]

    tokens = greedy_generate(export.path, ids.numpy(), 10, eos_token_id=int(first))

    assert tokens.shape == (1, 5)
    assert tokens[0, -1] == first


def test_checkpoint_modality_thresholds_use_text(tmp_path):
    shared = {"a": ["-inf"], "b": [0.5]}
    by_modality = {"a": {"image": [1.0], "text": [2.0]}, "b": {"image": [3.0]}}
    section = {"k_min": 1, "k_max": 2, "renormalize": "preserve_mass", "thresholds": shared}
    section["modality_thresholds"] = by_modality
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "gemoe": section}))

    routing = routing_from_checkpoint(str(tmp_path))

    assert routing.thresholds == {"a": [2.0], "b": [0.5]}


def test_per_modality_recipe_exports_text_thresholds(tmp_path):
    model_dir = tiny_vlms.save("qwen3_vl_moe", tiny_vlms.build("qwen3_vl_moe"), tmp_path / "model")
    recipe_file = tmp_path / "recipe.yaml"
    calibrate = ["calibrate", model_dir, "--target-sparsity", "0.3", "--per-modality", "--num-samples", "12"]
    result = CliRunner().invoke(app, [*calibrate, "-o", str(recipe_file)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(recipe_file)

    export = export_onnx(model_dir, tmp_path / "onnx", recipe=recipe_file)

    assert export.validation.passed
    exported = {
        path: [float(value) for value in values] for path, values in export.metadata["routing"]["thresholds"].items()
    }
    assert exported == {path: list(layer.modalities["text"]) for path, layer in recipe.layers.items()}
    assert all(math.isfinite(value) for values in exported.values() for value in values)
    assert all(value == -math.inf for layer in recipe.layers.values() for value in layer.thresholds)


def test_checkpoint_routing_read_back(tmp_path):
    section = {"k_min": 2, "k_max": 3, "renormalize": "none", "thresholds": {"model.layers.0.mlp": ["-inf"]}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "gemoe": section}))

    routing = routing_from_checkpoint(str(tmp_path))

    assert routing == RoutingSpec(k_min=2, k_max=3, renormalize="none", thresholds={"model.layers.0.mlp": [-math.inf]})
    assert routing_from_checkpoint(str(tmp_path / "missing")) is None
