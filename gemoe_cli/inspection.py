"""Describe a model's MoE structure and whether gemoe supports it (`gemoe inspect`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gemoe_cli.errors import UnsupportedModelError


@dataclass
class LayerDescription:
    """One MoE block as `gemoe inspect` reports it."""

    path: str
    num_experts: int
    top_k: int
    scoring: str
    selection_bias: bool
    shared_experts: bool


@dataclass
class ModelDescription:
    """The MoE structure of a model and the verdict on support."""

    source: str
    model_type: str
    family: str | None
    supported: bool
    reason: str
    note: str = ""
    layers: list[LayerDescription] = field(default_factory=list)

    @property
    def num_moe_layers(self) -> int:
        return len(self.layers)

    def to_json(self) -> dict:
        data = asdict(self)
        data["num_moe_layers"] = self.num_moe_layers
        return data


def describe_model(model, source: str = "") -> ModelDescription:
    """Describe a model instance (with weights or on the ``meta`` device)."""
    from gemoe_cli.routing.discovery import find_moe_blocks, model_type_of, resolve_adapter

    model_type = model_type_of(model)
    try:
        adapter = resolve_adapter(model)
    except UnsupportedModelError as error:
        return ModelDescription(source, model_type, None, False, str(error))
    try:
        blocks = find_moe_blocks(model)
    except UnsupportedModelError as error:
        return ModelDescription(source, model_type, adapter.name, False, str(error))

    layers = [
        LayerDescription(
            path=block.path,
            num_experts=block.num_experts,
            top_k=block.top_k,
            scoring=block.scoring_name,
            selection_bias=block.has_selection_bias,
            shared_experts=block.has_shared_experts,
        )
        for block in blocks
    ]
    smallest_k = min(layer.top_k for layer in layers)
    if smallest_k < 2:
        reason = (
            f"model type '{model_type}' ({source}) routes each token to its top-{smallest_k} expert, so there is "
            "no k to adapt; adaptive routing needs a model with top-k of 2 or more"
        )
        return ModelDescription(source, model_type, adapter.name, False, reason, adapter.note, layers)
    return ModelDescription(source, model_type, adapter.name, True, "supported", adapter.note, layers)


def describe_source(source: str, trust_remote_code: bool = False) -> ModelDescription:
    """Describe a model from its config alone: the model is built on the ``meta`` device, no weights load."""
    from gemoe_cli.models import build_skeleton, load_config
    from gemoe_cli.routing.families import adapter_for

    config = load_config(source, trust_remote_code=trust_remote_code)
    adapter = adapter_for(config.model_type)
    if adapter is not None and adapter.unsupported:
        reason = f"model type {config.model_type!r} is not supported: {adapter.unsupported}."
        return ModelDescription(source, config.model_type, adapter.name, False, reason)
    try:
        skeleton = build_skeleton(config)
    except UnsupportedModelError as error:
        return ModelDescription(source, config.model_type, None, False, str(error))
    return describe_model(skeleton, source)
