"""Threshold policy: gating entropy -> number of experts `k` per token.

``k = clamp(k_min + #{j : H > tau_j}, k_min, k_max)`` with non-decreasing thresholds ``tau``. A token whose
gating distribution is not finite gets ``k_max``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gemoe_cli.errors import InvalidInputError


def validate_thresholds(thresholds: Sequence[float], k_min: int, k_max: int, where: str = "thresholds") -> None:
    """Raise `InvalidInputError` unless thresholds fit ``k_min``/``k_max`` and never decrease."""
    if k_min < 1:
        raise InvalidInputError(f"k_min={k_min} is invalid; set k_min to 1 or more.")
    if k_min > k_max:
        raise InvalidInputError(f"k_min={k_min} is greater than k_max={k_max}; set k_min <= k_max.")
    if len(thresholds) != k_max - k_min:
        raise InvalidInputError(
            f"{where} has {len(thresholds)} values but k_max - k_min = {k_max - k_min}; "
            f"give one threshold per extra expert."
        )
    for i, value in enumerate(thresholds):
        if math.isnan(value):
            raise InvalidInputError(f"{where}[{i}] is NaN; use a number, -inf or inf.")
    for i in range(1, len(thresholds)):
        if thresholds[i] < thresholds[i - 1]:
            raise InvalidInputError(
                f"{where} must be non-decreasing, but {where}[{i}]={thresholds[i]} < "
                f"{where}[{i - 1}]={thresholds[i - 1]}; sort them."
            )


def experts_per_token(entropy: torch.Tensor, thresholds: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Map gating entropy (T,) to the number of experts each token engages (T,), as int64.

    Non-finite entropy (from non-finite router logits) maps to ``k_max``.
    """
    crossed = (entropy.unsqueeze(-1) > thresholds.to(entropy.device, entropy.dtype)).sum(dim=-1)  # (T,)
    k = (crossed + k_min).clamp_(k_min, k_max)
    return k.masked_fill_(~torch.isfinite(entropy), k_max)
