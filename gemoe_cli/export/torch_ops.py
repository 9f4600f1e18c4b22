"""PyTorch custom ops that the exporter turns into single ONNX nodes, and their translations.

``torch.ops.gemoe.entropy_adaptive_router`` becomes an ``ai.gemoe::EntropyAdaptiveRouter`` node, and
``torch.ops.gemoe.ort_moe`` becomes an onnxruntime ``com.microsoft::MoE`` node. A translation that
emits a bare custom-domain node survives the exporter's optimisation. A translation written as an
onnxscript function with a body would be inlined into standard ops (torch 2.13, onnxscript 0.7), so
the router's body is attached after export instead (`gemoe_cli.export.ops.attach_function_bodies`).

Both ops have eager implementations, so a traced model also runs in PyTorch and the op semantics can
be tested against onnxruntime. Legend for shape comments: T tokens, E experts, K slots of the static
selection, M = k_max slots, D hidden size, I expert width.
"""

from __future__ import annotations

import torch

from gemoe_cli.export.ops import DOMAIN, DOMAIN_VERSION, MICROSOFT_DOMAIN
from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores
from gemoe_cli.routing.policy import experts_per_token
from gemoe_cli.routing.selection import truncate_selection

ORT_MOE_BACKGROUND = -1.0e4
"""Router input of experts outside a token's kept slots in the `ort` body: softmax turns it into 0 in float32."""


@torch.library.custom_op("gemoe::entropy_adaptive_router", mutates_args=())
def entropy_adaptive_router(
    router_logits: torch.Tensor,
    thresholds: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    selection_bias: torch.Tensor | None,
    k_min: int,
    k_max: int,
    scoring: str,
    renormalize: str,
    bias_on_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weights (T, M), index (T, M), k (T,)): the kept slots in rank order, dropped slots (0, E)."""
    scores = router_logits.reshape(-1, router_logits.size(-1))  # (T, E)
    num_experts = scores.size(-1)
    distribution = gating_distribution(scores, scoring)
    entropy = gating_entropy(distribution)
    nonfinite = ~torch.isfinite(scores).all(dim=-1)
    entropy = torch.where(nonfinite, torch.full_like(entropy, float("nan")), entropy)
    k = experts_per_token(entropy, thresholds, k_min, k_max)  # (T,)

    if bias_on_logits and selection_bias is not None:
        ranking = scores.float() + selection_bias.float()
    else:
        ranking = selection_scores(scores, scoring, selection_bias)
    slot_scores = ranking.gather(-1, top_k_index.clamp(0, num_experts - 1))  # (T, K)
    index, weights = truncate_selection(top_k_index, top_k_weights, slot_scores, k, renormalize, num_experts)

    ordered = torch.nan_to_num(slot_scores, nan=float("-inf"))
    order = torch.sort(ordered, dim=-1, descending=True, stable=True).indices[:, :k_max]  # (T, M)
    return weights.gather(-1, order), index.gather(-1, order), k


@entropy_adaptive_router.register_fake
def _entropy_adaptive_router_fake(
    router_logits,
    thresholds,
    top_k_index,
    top_k_weights,
    selection_bias,
    k_min,
    k_max,
    scoring,
    renormalize,
    bias_on_logits,
):
    tokens = top_k_index.shape[0]
    return (
        top_k_weights.new_empty((tokens, k_max)),
        top_k_index.new_empty((tokens, k_max)),
        top_k_index.new_empty((tokens,)),
    )


@torch.library.custom_op("gemoe::ort_moe", mutates_args=())
def ort_moe(
    hidden_states: torch.Tensor,
    router_input: torch.Tensor,
    fc1_weights: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weights: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    k: int,
) -> torch.Tensor:
    """Compute what onnxruntime's ``com.microsoft::MoE`` computes with interleaved SwiGLU weights.

    ``softmax(router_input)`` picks the top `k` experts of each token (T, D), and their probabilities
    weight the expert outputs. ``fc1_weights`` is (E, 2I, D) with gate and up rows interleaved.
    """
    probabilities = torch.softmax(router_input.float(), dim=-1)  # (T, E)
    top_weights, top_index = torch.topk(probabilities, k, dim=-1)  # (T, k)
    output = torch.zeros_like(hidden_states)
    for expert in range(fc1_weights.size(0)):
        tokens, slots = torch.nonzero(top_index == expert, as_tuple=True)
        if tokens.numel() == 0:
            continue
        projected = hidden_states[tokens] @ fc1_weights[expert].T  # (n, 2I)
        if fc1_bias is not None:
            projected = projected + fc1_bias[expert]
        gate, up = projected[:, 0::2], projected[:, 1::2]
        expert_output = (torch.nn.functional.silu(gate) * up) @ fc2_weights[expert].T  # (n, D)
        if fc2_bias is not None:
            expert_output = expert_output + fc2_bias[expert]
        scaled = expert_output * top_weights[tokens, slots].unsqueeze(-1).to(expert_output.dtype)
        output.index_add_(0, tokens, scaled)
    return output


@ort_moe.register_fake
def _ort_moe_fake(hidden_states, router_input, fc1_weights, fc1_bias, fc2_weights, fc2_bias, k):
    return torch.empty_like(hidden_states)


def translation_table() -> dict:
    """Return the `custom_translation_table` for `torch.onnx.export` that emits the custom-domain nodes.

    The schemas of both ops must be registered while exporting (`gemoe_cli.export.ops.registered_schemas`).
    """
    from onnxscript.values import Opset

    gemoe_opset = Opset(DOMAIN, DOMAIN_VERSION)
    microsoft_opset = Opset(MICROSOFT_DOMAIN, 1)

    def translate_router(
        router_logits,
        thresholds,
        top_k_index,
        top_k_weights,
        selection_bias=None,
        k_min: int = 1,
        k_max: int = 1,
        scoring: str = "softmax",
        renormalize: str = "preserve_mass",
        bias_on_logits: bool = False,
    ):
        return gemoe_opset.EntropyAdaptiveRouter(
            router_logits,
            thresholds,
            top_k_index,
            top_k_weights,
            selection_bias,
            k_min=k_min,
            k_max=k_max,
            scoring=scoring,
            renormalize=renormalize,
            bias_on_logits=int(bias_on_logits),
            _num_outputs=3,
        )

    def translate_ort_moe(hidden_states, router_input, fc1_weights, fc1_bias, fc2_weights, fc2_bias, k: int = 1):
        # activation_alpha 1 and activation_beta 0 make onnxruntime's SwiGLU silu(gate) * up.
        return microsoft_opset.MoE(
            hidden_states,
            router_input,
            fc1_weights,
            fc1_bias,
            fc2_weights,
            fc2_bias,
            k=k,
            activation_type="swiglu",
            swiglu_fusion=1,
            normalize_routing_weights=0,
            activation_alpha=1.0,
            activation_beta=0.0,
        )

    return {
        torch.ops.gemoe.entropy_adaptive_router.default: translate_router,
        torch.ops.gemoe.ort_moe.default: translate_ort_moe,
    }
