"""Retention: quality of the adaptive model relative to static top-k, measured by running both.

Each batch runs twice in the same process, static then adaptive, so no logits are stored:

- ``nll``: ``exp(NLL_static - NLL_adaptive)``, the perplexity ratio of next-token prediction;
- ``agreement``: the share of positions where both models predict the same next token (greedy);
- ``kl``: ``exp(-mean KL(p_static || p_adaptive))`` over next-token distributions.

All three are 1 for a model identical to static routing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

Metric = Literal["nll", "agreement", "kl"]
METRICS: tuple[Metric, ...] = ("nll", "agreement", "kl")


@dataclass(frozen=True)
class Evaluation:
    """Static and adaptive quality on one data set, and the adaptive run's sparsity."""

    tokens: int
    nll_static: float
    nll_adaptive: float
    agreement: float
    kl: float
    sparsity: float

    def retention(self, metric: Metric) -> float:
        if metric == "nll":
            return math.exp(self.nll_static - self.nll_adaptive)
        if metric == "agreement":
            return self.agreement
        if metric == "kl":
            return math.exp(-self.kl)
        raise ValueError(f"unknown retention metric {metric!r}; expected one of {', '.join(METRICS)}")

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["retention"] = {metric: self.retention(metric) for metric in METRICS}
        return data


def _next_token_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, use_cache=False)
    return output.logits[:, :-1].float()  # (B, L - 1, V)


@torch.no_grad()
def evaluate(model, routing, batches: Iterable[torch.Tensor], progress=None) -> Evaluation:
    """Run each batch of token ids (B, L) statically and adaptively, and compare next-token predictions.

    `routing` is the `AdaptiveRouting` attached to `model`; its counters are reset and afterwards hold
    the adaptive run's activations.
    """
    routing.reset_counters()
    tokens = 0
    nll_static = nll_adaptive = agreeing = kl_sum = 0.0
    device = next(model.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        targets = batch[:, 1:]
        with routing.static():
            static_log_probs = torch.log_softmax(_next_token_logits(model, batch), dim=-1)
        adaptive_log_probs = torch.log_softmax(_next_token_logits(model, batch), dim=-1)

        nll_static -= static_log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        nll_adaptive -= adaptive_log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        agreeing += (static_log_probs.argmax(-1) == adaptive_log_probs.argmax(-1)).sum().item()
        kl = (static_log_probs.exp() * (static_log_probs - adaptive_log_probs)).sum(-1)
        kl_sum += kl.clamp_min(0.0).sum().item()
        tokens += targets.numel()
        if progress is not None:
            progress(batch)

    if tokens == 0:
        raise ValueError("no tokens to evaluate")
    return Evaluation(
        tokens=tokens,
        nll_static=nll_static / tokens,
        nll_adaptive=nll_adaptive / tokens,
        agreement=agreeing / tokens,
        kl=kl_sum / tokens,
        sparsity=routing.sparsity(),
    )


@torch.no_grad()
def mean_nll(model, batches: Iterable[torch.Tensor]) -> float:
    """Return the mean next-token NLL of `model` as it routes now."""
    total = 0.0
    tokens = 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        log_probs = torch.log_softmax(_next_token_logits(model, batch), dim=-1)
        total -= log_probs.gather(-1, batch[:, 1:].unsqueeze(-1)).sum().item()
        tokens += batch[:, 1:].numel()
    return total / max(tokens, 1)
