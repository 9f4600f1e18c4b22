"""Per-family knowledge in one registry: how each model family's router reports its scores.

A family is a group of model types that share router code. Most transformers 5.x MoE blocks follow one
pattern, which the default adapter covers:

    router_logits, top_k_weights, top_k_index = block.<router>(hidden_states[, selection_bias])
    output = block.experts(hidden_states, top_k_index, top_k_weights)

An adapter only states what differs: the scoring of the router output, where the logits sit in the
router's return value, and (for the few families that do not call a decorated experts class) how one
expert computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gemoe_cli.routing.gating import Scoring

BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
"""Attribute and argument names under which transformers 5.x keeps a score-correction (selection) bias."""


@dataclass(frozen=True)
class FamilyAdapter:
    """The attachment rules of adaptive routing for one family's MoE blocks.

    Attributes:
        name: the family name shown to users.
        model_types: the `config.model_type` values of the family.
        scoring: how the router output becomes the gating distribution, or a function of the router
            module for families that choose it in the config.
        logits_position: where the scores sit in the router's return value (`None`: it returns a tensor).
        router_names: attribute names of the router inside the MoE block, tried in order.
        bias_from_argument: the block passes its selection bias to the router as the second argument.
        bias_on_logits: the router adds its selection bias to raw logits, not to scores (Kolibri).
        skip_router: routers of this family that do not select by score (hash routers) and stay static.
        block_forward: a replacement `forward(block, hidden_states)` for blocks that do not call their
            experts with a top-k selection (llama4 scales expert inputs by dense scores).
        expert_forward: `forward(experts, expert_id, hidden_states)` for experts classes that are not
            decorated with transformers' `use_experts_implementation`.
        note: what users should know about this family's adaptation (shown by `gemoe inspect`).
        unsupported: why adaptive `k` is undefined for this family; `None` when supported.
    """

    name: str
    model_types: tuple[str, ...]
    scoring: Scoring | Callable[[object], Scoring] = "softmax"
    logits_position: int | None = 0
    router_names: tuple[str, ...] = ("gate", "router")
    bias_from_argument: bool = False
    bias_on_logits: bool = False
    skip_router: Callable[[object], bool] | None = None
    block_forward: Callable | None = None
    expert_forward: Callable | None = None
    note: str = ""
    unsupported: str | None = None
    extra: dict = field(default_factory=dict)

    def scoring_for(self, router: object) -> Scoring:
        """Return the scoring of this family's router instance."""
        return self.scoring(router) if callable(self.scoring) else self.scoring


_REGISTRY: dict[str, FamilyAdapter] = {}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add an adapter to the registry under each of its model types."""
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model type {model_type!r} is already registered by {_REGISTRY[model_type].name}")
        _REGISTRY[model_type] = adapter
    return adapter


def adapter_for(model_type: str) -> FamilyAdapter | None:
    """Return the adapter registered for a model type, or `None` when the family is unknown."""
    _load_builtin_adapters()
    return _REGISTRY.get(model_type)


def registered_model_types() -> list[str]:
    """Return every registered model type, supported or not, sorted."""
    _load_builtin_adapters()
    return sorted(_REGISTRY)


def _load_builtin_adapters() -> None:
    # The built-in table imports torch-dependent helpers, so it loads on first use, not at import time.
    if not _REGISTRY:
        from gemoe_cli.routing import builtin_families  # noqa: F401
