"""Truncate a static top-K selection to the first `k` experts of each token.

Legend for shape comments: T tokens, E experts, K slots of the static selection.
"""

from __future__ import annotations

from typing import Literal

import torch

Renormalize = Literal["preserve_mass", "none"]


def rank_slots(slot_scores: torch.Tensor) -> torch.Tensor:
    """Return each slot's rank (0 = best) by descending selection score (T, K) -> (T, K).

    Ties keep slot order, and NaN scores rank last, so the result never depends on an unsorted `topk`.
    """
    scores = torch.nan_to_num(slot_scores.float(), nan=float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (T, K) slot at each rank
    ranks = torch.empty_like(order)
    positions = torch.arange(order.size(-1), device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def truncate_selection(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    slot_scores: torch.Tensor,
    k: torch.Tensor,
    renormalize: Renormalize,
    dropped_index: torch.Tensor | int,
    ranks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `k` best-scored slots of each token and drop the rest.

    Args:
        top_k_index: (T, K) experts chosen by the router.
        top_k_weights: (T, K) their routing weights.
        slot_scores: (T, K) the router's selection score of each chosen expert.
        k: (T,) experts to keep per token, ``1 <= k <= K``.
        renormalize: ``preserve_mass`` rescales kept weights to the original weight sum, ``none`` keeps them.
        dropped_index: index written into dropped slots, either the sentinel ``E`` or a (T, K) tensor of
            valid experts for implementations that cannot skip the sentinel (their weight is 0 either way).
        ranks: `rank_slots(slot_scores)`, when the caller has it already.

    Returns:
        The new (T, K) index and weights. Tokens with ``k == K`` are returned bit-for-bit unchanged.
    """
    if ranks is None:
        ranks = rank_slots(slot_scores)
    keep = ranks < k.unsqueeze(-1)  # (T, K)
    weights = torch.where(keep, top_k_weights, 0.0)

    if renormalize == "preserve_mass":
        # A token that kept no mass gets an infinite or NaN scale, so the finiteness test also covers it.
        scale = top_k_weights.sum(dim=-1, keepdim=True) / weights.sum(dim=-1, keepdim=True)  # (T, 1)
        rescaled = (k < top_k_index.size(-1)).unsqueeze(-1) & torch.isfinite(scale)
        weights = torch.where(rescaled, weights * scale, weights)

    index = torch.where(keep, top_k_index, dropped_index)
    return index, weights.to(top_k_weights.dtype)
