"""Find the MoE blocks of a transformers model and describe them.

A MoE block is a module with an ``experts`` child and a router child (``gate`` or ``router`` in
transformers 5.x). Discovery works on real weights and on the ``meta`` device alike, so `gemoe inspect`
can describe a model from its config without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemoe_cli.errors import UnsupportedModelError
from gemoe_cli.routing.families import BIAS_NAMES, FamilyAdapter, adapter_for

_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "top_k_experts", "num_experts_per_token")
_NUM_EXPERTS_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert", "shared_mlp")


@dataclass
class MoEBlock:
    """One MoE block of a model, with what adaptive routing needs to know about it."""

    path: str
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    adapter: FamilyAdapter
    num_experts: int
    top_k: int

    @property
    def scoring(self):
        return self.adapter.scoring_for(self.router)

    @property
    def scoring_name(self) -> str:
        """The scoring as shown to users: softmax, sigmoid, probabilities, or `<function>-normalised`."""
        scoring = self.scoring
        return scoring if isinstance(scoring, str) else f"{type(scoring).__name__}-normalised"

    @property
    def has_selection_bias(self) -> bool:
        if self.adapter.bias_from_argument:
            return True
        return static_selection_bias(self.block, self.router) is not None

    @property
    def has_shared_experts(self) -> bool:
        return any(getattr(self.block, name, None) is not None for name in _SHARED_EXPERT_NAMES)


def static_selection_bias(block: torch.nn.Module, router: torch.nn.Module) -> torch.Tensor | None:
    """Return the score-correction bias stored on the router (or a child of it) or the block, if any."""
    source = selection_bias_source(block, router)
    return None if source is None else getattr(*source)


def selection_bias_source(block: torch.nn.Module, router: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """Return (module, attribute name) of the score-correction bias that `static_selection_bias` finds."""
    for owner in (router, *router.children(), block):
        for name in BIAS_NAMES:
            if isinstance(getattr(owner, name, None), torch.Tensor):
                return owner, name
    return None


def model_type_of(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def resolve_adapter(model: torch.nn.Module) -> FamilyAdapter:
    """Return the family adapter of a model, or raise `UnsupportedModelError` saying why there is none."""
    model_type = model_type_of(model)
    candidates = [model_type, model_type.removesuffix("_text")]
    config = getattr(model, "config", None)
    for name in ("text_config", "thinker_config"):
        sub_config = getattr(config, name, None)
        if sub_config is not None:
            candidates.append(getattr(sub_config, "model_type", ""))

    for candidate in candidates:
        adapter = adapter_for(candidate)
        if adapter is not None:
            if adapter.unsupported:
                raise UnsupportedModelError(
                    f"model type {model_type!r} is not supported: {adapter.unsupported}; use a model of a supported "
                    "family (`gemoe inspect --list-families` lists them)."
                )
            return adapter
    raise UnsupportedModelError(
        f"model type {model_type!r} is not a supported MoE family; run `gemoe inspect --list-families` "
        "for the supported ones."
    )


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Return every MoE block of a supported model, in module order.

    Raises:
        UnsupportedModelError: the family is not supported, or the model has no MoE block.
    """
    adapter = resolve_adapter(model)
    blocks = []
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        router = next(
            (
                getattr(module, name)
                for name in adapter.router_names
                if isinstance(getattr(module, name, None), torch.nn.Module)
            ),
            None,
        )
        if router is None or (adapter.skip_router is not None and adapter.skip_router(router)):
            continue
        config = getattr(experts, "config", None) or getattr(module, "config", None) or getattr(model, "config", None)
        num_experts = _first_int((experts, router, module, config), _NUM_EXPERTS_NAMES)
        top_k = _first_int((router, module, config), _TOP_K_NAMES)
        if num_experts is None or top_k is None:
            continue
        blocks.append(MoEBlock(path, module, router, experts, adapter, num_experts, top_k))

    if not blocks:
        raise UnsupportedModelError(
            f"no MoE layer found in model type {model_type_of(model)!r}; gemoe needs a Mixture-of-Experts model."
        )
    return blocks


def _first_int(owners, names) -> int | None:
    for owner in owners:
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
