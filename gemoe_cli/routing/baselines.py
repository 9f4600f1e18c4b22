"""Baseline policies that choose `k` per token without gating entropy, for side-by-side benchmarks.

Each policy sees the gating probabilities of the static top-K slots in rank order (best first) and
returns how many of them to keep. They run through the same adaptive layer and sparse dispatch as
GeMoE, so speed differences between policies come from routing decisions only.

Legend for shape comments: T tokens, K slots of the static selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopP:
    """Keep experts in rank order until their cumulative gating probability reaches `p`."""

    p: float
    name: str = "top_p"

    def experts_per_token(self, ranked_probabilities: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
        cumulative = torch.cumsum(ranked_probabilities, dim=-1)  # (T, K)
        # k is the first rank whose cumulative probability reaches p; all K when none does.
        k = (cumulative < self.p).sum(dim=-1) + 1
        return k.clamp(k_min, k_max)


@dataclass(frozen=True)
class RatioSkip:
    """Drop an expert whose gating probability is below `beta` times the top expert's."""

    beta: float
    name: str = "ratio_skip"

    def experts_per_token(self, ranked_probabilities: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
        top = ranked_probabilities[:, :1]  # (T, 1)
        k = (ranked_probabilities >= self.beta * top).sum(dim=-1)
        return k.clamp(k_min, k_max)


@dataclass(frozen=True)
class StaticK:
    """Keep a fixed number of experts per token (static top-(K-1) as a baseline)."""

    k: int
    name: str = "static_k"

    def experts_per_token(self, ranked_probabilities: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
        k = torch.full(ranked_probabilities.shape[:1], self.k, dtype=torch.long, device=ranked_probabilities.device)
        return k.clamp(k_min, k_max)
