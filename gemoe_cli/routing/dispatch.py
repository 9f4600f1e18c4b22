"""Sparse expert dispatch: compute only the active (token, expert) pairs.

Registered with transformers' experts interface as ``gemoe_sparse``. Dropped slots carry the sentinel
expert index ``E`` and cost no expert compute: they are removed before any matmul. This is correct for
every experts class decorated with ``use_experts_implementation`` (gated or not, concatenated or
interleaved gate/up through the class's own ``_apply_gate``, transposed weights, expert biases, post-expert
norms). On CUDA the compacted pairs go through one grouped matmul per projection; elsewhere a loop over
the experts that received tokens.

Legend for shape comments: T tokens, K slots per token, P active pairs, D hidden size, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EXPERTS_IMPLEMENTATION = "gemoe_sparse"


def active_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int):
    """Return the active pairs sorted by expert: (expert ids, token ids, weights, tokens per expert).

    Slots whose index is outside ``[0, E)`` (the sentinel) are dropped here.
    """
    slots = top_k_index.size(-1)
    flat_index = top_k_index.reshape(-1)  # (T*K,)
    keep = (flat_index >= 0) & (flat_index < num_experts)
    positions = keep.nonzero().squeeze(-1)  # (P,)

    expert_ids = flat_index[positions]
    expert_ids, order = torch.sort(expert_ids, stable=True)
    positions = positions[order]
    token_ids = positions // slots
    weights = top_k_weights.reshape(-1)[positions]
    tokens_per_expert = torch.bincount(expert_ids, minlength=num_experts)  # (E,)
    return expert_ids, token_ids, weights, tokens_per_expert


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = inputs @ weight if transposed else inputs @ weight.transpose(-2, -1)
    return out if bias is None else out + bias


def decorated_expert_forward(experts: torch.nn.Module, expert_id: int, inputs: torch.Tensor) -> torch.Tensor:
    """Run one expert of a class decorated with ``use_experts_implementation`` on its tokens (n, D)."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up_weight = getattr(experts, up_name)[expert_id]
    up_bias = getattr(experts, f"{up_name}_bias")[expert_id] if experts.has_bias else None
    hidden = _linear(inputs.to(up_weight.dtype), up_weight, up_bias, experts.is_transposed)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)

    down_bias = experts.down_proj_bias[expert_id] if experts.has_bias else None
    out = _linear(hidden, experts.down_proj[expert_id], down_bias, experts.is_transposed)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    return out


def _grouped_projection(inputs, weight, bias, expert_ids, offsets, transposed):
    # grouped_mm wants (E, in, out) weights and rows sorted by expert; biases are gathered per row.
    weight = weight if transposed else weight.transpose(-2, -1)
    out = torch.nn.functional.grouped_mm(inputs.to(weight.dtype), weight, offs=offsets)
    return out if bias is None else out + bias[expert_ids]


def grouped_pairs_forward(experts, inputs, expert_ids, tokens_per_expert):
    """Run all active pairs (P, D) of a decorated experts class with one grouped matmul per projection."""
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up_bias = getattr(experts, f"{up_name}_bias") if experts.has_bias else None
    hidden = _grouped_projection(
        inputs, getattr(experts, up_name), up_bias, expert_ids, offsets, experts.is_transposed
    )  # (P, 2I) or (P, I)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)  # (P, I)

    down_bias = experts.down_proj_bias if experts.has_bias else None
    out = _grouped_projection(hidden, experts.down_proj, down_bias, expert_ids, offsets, experts.is_transposed)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    return out  # (P, D)


def _grouped_mm_usable(experts: torch.nn.Module, inputs: torch.Tensor) -> bool:
    if inputs.device.type != "cuda" or not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if not hasattr(experts, "has_gate") or getattr(experts, "_gemoe_expert_forward", None) is not None:
        return False
    # grouped_mm needs 16-byte aligned strides, so odd widths fall back to the loop.
    weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return all(size * weight.element_size() % 16 == 0 for size in weight.shape[1:])


def sparse_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Compute ``sum_k w[t, k] * expert_{index[t, k]}(x[t])`` over active slots only (T, D) -> (T, D).

    Experts with ``_gemoe_input_scaled`` set take ``w * x`` as input instead of scaling their output (llama4).
    Hidden states of shape (B, S, D), as DBRX passes them, come back in that shape.
    """
    input_shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, input_shape[-1])
    num_experts = experts.num_experts
    expert_ids, token_ids, weights, tokens_per_expert = active_pairs(top_k_index, top_k_weights, num_experts)
    output = torch.zeros_like(hidden_states)  # (T, D)
    if expert_ids.numel() == 0:
        return output.view(input_shape)

    input_scaled = getattr(experts, "_gemoe_input_scaled", False)
    inputs = hidden_states[token_ids]  # (P, D)
    if input_scaled:
        inputs = inputs * weights.unsqueeze(-1).to(inputs.dtype)

    if _grouped_mm_usable(experts, inputs):
        pair_outputs = grouped_pairs_forward(experts, inputs, expert_ids, tokens_per_expert)
    else:
        pair_outputs = _looped_pairs_forward(experts, inputs, tokens_per_expert)

    if not input_scaled:
        pair_outputs = pair_outputs * weights.unsqueeze(-1).to(pair_outputs.dtype)
    return output.index_add_(0, token_ids, pair_outputs.to(output.dtype)).view(input_shape)


def _looped_pairs_forward(experts, inputs, tokens_per_expert):
    expert_forward: Callable = getattr(experts, "_gemoe_expert_forward", None) or decorated_expert_forward
    outputs = []
    start = 0
    # One host sync for the counts, none inside the loop.
    for expert_id, count in enumerate(tokens_per_expert.tolist()):
        if count == 0:
            continue
        outputs.append(expert_forward(experts, expert_id, inputs[start : start + count]))
        start += count
    return torch.cat(outputs, dim=0)  # (P, D)


def register_experts_implementation() -> str:
    """Register ``gemoe_sparse`` with transformers' experts interface (idempotent) and return its name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, sparse_experts_forward)
    return EXPERTS_IMPLEMENTATION
