"""Export of the trained reference model: checker, parity with PyTorch, sparsity counts and generation.

The reference model comes from `ensure_reference_model`, which trains it on first use (several minutes on
a CPU) and reuses the cached copy afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gemoe_cli.export import decoder, ops
from gemoe_cli.export.generate import greedy_generate
from gemoe_cli.export.onnx_export import export_graph
from gemoe_cli.export.validate import validate_export
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from tests.export.conftest import quantile_routing

# Training the reference model on a cold cache counts against the timeout of the first test that needs it.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference model, its tokenizer, thresholds fitted on held-out text, and its ONNX export."""
    from transformers import AutoTokenizer

    from gemoe_cli.models import load_model
    from gemoe_cli.reference_model import ensure_reference_model

    directory = ensure_reference_model(progress=False)
    model = load_model(str(directory), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    heldout = (directory / "heldout.txt").read_text("utf-8")
    ids = tokenizer(heldout[:4000], return_tensors="pt").input_ids[:, :256]
    routing = quantile_routing(model, ids)
    path = tmp_path_factory.mktemp("reference-onnx") / "model.onnx"
    graph = export_graph(model, routing, path)
    return {"model": model, "tokenizer": tokenizer, "routing": routing, "path": path, "graph": graph, "text": heldout}


def test_reference_export_has_router_nodes(reference):
    proto = onnx.load(reference["path"])

    onnx.checker.check_model(proto, full_check=True)
    assert len(ops.custom_nodes(proto)) == len(find_moe_blocks(reference["model"]))
    assert [function.overload for function in proto.functions] == ["softmax-preserve_mass"]


def test_reference_onnxruntime_matches_pytorch(reference):
    report = validate_export(reference["path"], reference["model"], reference["routing"])

    assert report.errors == []
    for check in report.checks.values():
        assert check.max_abs_diff <= 1e-4, f"{check.name}: {check.max_abs_diff} in {check.case}"
    assert report.checks[decoder.EXPERT_ACTIVATIONS].max_abs_diff == 0


def test_reference_greedy_generation_matches_pytorch(reference):
    model, tokenizer = reference["model"], reference["tokenizer"]
    prompts = ["The assert statement", "A context manager"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    tokens = greedy_generate(
        reference["path"],
        batch.input_ids.numpy(),
        16,
        attention_mask=batch.attention_mask.numpy(),
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with attach_adaptive_routing(model, reference["routing"].thresholds) as adaptive, torch.no_grad():
        expected = model.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        sparsity = adaptive.sparsity()

    np.testing.assert_array_equal(tokens, expected.numpy())
    assert sparsity > 0.1
