"""Gating distribution and gating entropy of a router.

Legend for shape comments: T tokens, E experts, K experts selected by static top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Scoring = Literal["softmax", "sigmoid", "probabilities"] | Callable[[torch.Tensor], torch.Tensor]
"""The rule that turns a router's raw output into the gating distribution.

- ``softmax``: the output is logits, ``p = softmax(logits)``.
- ``sigmoid``: the output is logits of a sigmoid-scored router, ``p = sigmoid(logits) / sum(sigmoid(logits))``.
- ``probabilities``: the router already returns ``softmax(logits)``.
- a function ``f`` (a router's own positive score function, such as DeepSeek-V4's): ``p = f(logits) / sum f``.
"""


def gating_distribution(router_output: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """Turn a router's raw output (T, E) into a distribution over all E experts, in float32.

    A selection bias (score-correction bias) never enters the distribution. Rows with non-finite
    input come out non-finite; callers detect them with `torch.isfinite`.
    """
    scores = router_output.float()  # (T, E)
    if scoring == "softmax":
        return torch.softmax(scores, dim=-1)
    if scoring == "sigmoid":
        sigmoid = torch.sigmoid(scores)
        return sigmoid / sigmoid.sum(dim=-1, keepdim=True)
    if scoring == "probabilities":
        return scores
    if callable(scoring):
        positive = scoring(scores)
        return positive / positive.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown scoring {scoring!r}; expected softmax, sigmoid or probabilities")


def gating_entropy(distribution: torch.Tensor) -> torch.Tensor:
    """Return the entropy in nats of each row of a gating distribution (T, E) -> (T,).

    Zero probabilities contribute 0 (the limit of p log p), so a one-hot row has entropy 0. NaN stays NaN.
    """
    return torch.special.entr(distribution).sum(dim=-1)  # entr(p) = -p log p, and entr(0) = 0


def selection_scores(router_output: torch.Tensor, scoring: Scoring, bias: torch.Tensor | None) -> torch.Tensor:
    """Return the scores the router ranks experts by (T, E).

    A score-correction bias is added to the router's scores (sigmoid, or softmax probabilities as in
    ERNIE 4.5). It only reorders experts and never enters the gating distribution. Without a bias,
    softmax routers rank by logits, because logits order experts like the probabilities but never tie
    through underflow.
    """
    scores = router_output.float()
    if scoring == "sigmoid":
        scores = torch.sigmoid(scores)
    elif callable(scoring):
        scores = scoring(scores)
    if bias is None:
        return scores
    if scoring == "softmax":
        scores = torch.softmax(scores, dim=-1)
    return scores + bias.float()
