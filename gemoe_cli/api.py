"""The Python API the CLI wraps: describe a model as a recipe sees it, and apply a recipe to it.

    from gemoe_cli.api import apply_recipe, load_model
    from gemoe_cli.recipe import load_recipe

    model = load_model("allenai/OLMoE-1B-7B-0924")
    with apply_recipe(model, load_recipe("olmoe.yaml")) as routing:
        model.generate(...)
        print(routing.sparsity())

`apply_recipe` changes the model in place and returns an `AdaptiveRouting` handle; leaving the `with`
block (or calling `remove()`) restores the original routers.
"""

from __future__ import annotations

import logging

from gemoe_cli.models import load_model
from gemoe_cli.recipe import ModelIdentity, Recipe, check_recipe_matches, router_fingerprint
from gemoe_cli.routing import AdaptiveRouting, attach_adaptive_routing, find_moe_blocks
from gemoe_cli.routing.discovery import model_type_of

logger = logging.getLogger(__name__)

__all__ = ["apply_recipe", "load_model", "model_identity", "router_weights"]


def router_weights(model) -> list[tuple[str, object]]:
    """Return the named router parameters and selection-bias buffers of every MoE block, in module order."""
    named = []
    for block in find_moe_blocks(model):
        for name, tensor in block.router.named_parameters():
            named.append((f"{block.path}.router.{name}", tensor))
        for name, tensor in block.router.named_buffers():
            named.append((f"{block.path}.router.{name}", tensor))
        for name in ("e_score_correction_bias", "expert_bias"):
            tensor = getattr(block.block, name, None)
            if tensor is not None and hasattr(tensor, "shape"):
                named.append((f"{block.path}.{name}", tensor))
    return named


def model_identity(model, name_or_path: str | None = None) -> ModelIdentity:
    """Return the identity a recipe records for `model`: family, layer count, E, K and router fingerprint."""
    blocks = find_moe_blocks(model)
    return ModelIdentity(
        model_type=model_type_of(model),
        num_moe_layers=len(blocks),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        router_fingerprint=router_fingerprint(router_weights(model)),
        name_or_path=name_or_path,
    )


def apply_recipe(
    model,
    recipe: Recipe,
    *,
    ignore_fingerprint: bool = False,
    sparse_dispatch: bool = True,
) -> AdaptiveRouting:
    """Check `recipe` against `model` and attach its adaptive routing in place.

    Raises:
        RecipeMismatchError: the recipe describes another model (family, layers, E, K or router weights).
    """
    blocks = find_moe_blocks(model)
    identity = model_identity(model)
    for warning in check_recipe_matches(recipe, identity, [block.path for block in blocks], ignore_fingerprint):
        logger.warning(warning)
    return attach_adaptive_routing(
        model,
        {path: layer.thresholds for path, layer in recipe.layers.items()},
        k_min=recipe.routing.k_min,
        k_max=recipe.resolved_k_max,
        renormalize=recipe.routing.renormalize,
        sparse_dispatch=sparse_dispatch,
        modality_thresholds={path: layer.modalities for path, layer in recipe.layers.items() if layer.modalities},
    )
