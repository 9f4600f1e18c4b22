"""Shared fixtures for the export tests: tiny models with thresholds that drop experts, exported once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gemoe_cli.export.onnx_export import export_graph
from gemoe_cli.export.patching import RoutingSpec
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from tests import tiny_models

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")


def quantile_routing(model: torch.nn.Module, ids: torch.Tensor | None = None) -> RoutingSpec:
    """Place each layer's thresholds at evenly spaced entropy quantiles of a calibration batch `ids`.

    Tokens then spread over every k from 1 to K, so the export really drops experts. The default batch is
    random ids of the tiny models' vocabulary.
    """
    if ids is None:
        ids = tiny_models.input_ids(batch=2, seq=16, seed=3)
    entropies: dict[str, torch.Tensor] = {}
    with torch.no_grad(), attach_adaptive_routing(model, {}) as routing:
        for layer in routing.layers.values():
            layer.observers.append(lambda event: entropies.setdefault(event.path, event.entropy))
        tiny_models.forward_logits(model, ids)
    thresholds = {}
    for block in find_moe_blocks(model):
        levels = torch.linspace(0, 1, block.top_k + 1)[1:-1]
        thresholds[block.path] = torch.quantile(entropies[block.path], levels).tolist()
    return RoutingSpec(thresholds=thresholds)


@dataclass
class ExportedModel:
    """A tiny model, its routing and the ONNX file exported from it."""

    model_type: str
    model: torch.nn.Module
    routing: RoutingSpec
    path: Path
    graph: dict


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Return a function (model_type, body) -> `ExportedModel`, exporting each pair once per session."""
    cache: dict[tuple[str, str], ExportedModel] = {}

    def get(model_type: str, body: str = "portable") -> ExportedModel:
        key = (model_type, body)
        if key not in cache:
            model = tiny_models.build(model_type)
            routing = quantile_routing(model)
            path = tmp_path_factory.mktemp(f"{model_type}-{body}") / "model.onnx"
            graph = export_graph(model, routing, path, body=body)
            cache[key] = ExportedModel(model_type, model, routing, path, graph)
        return cache[key]

    return get
