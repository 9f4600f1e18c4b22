"""Retention: quality of the adaptive model relative to static top-k, measured by running both.

Each batch runs twice in the same process, static then adaptive, so no logits are stored:

- ``nll``: ``exp(NLL_static - NLL_adaptive)``, the perplexity ratio of next-token prediction;
- ``agreement``: the share of positions where both models predict the same next token (greedy);
- ``kl``: ``exp(-mean KL(p_static || p_adaptive))`` over next-token distributions;
- ``exact_match`` (image+text data only): the share of samples whose greedy answer, generated from the prompt
  with as many new tokens as the reference answer has (at most `MAX_ANSWER_TOKENS`), is the same token for
  token under both routings.

All four are 1 for a model identical to static routing. A batch is either a (B, L) tensor of token ids, scored
at every position, or a `MultimodalBatch`, scored on its answer tokens given the images.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

Metric = Literal["nll", "agreement", "kl", "exact_match"]
METRICS: tuple[Metric, ...] = ("nll", "agreement", "kl")
"""Metrics measured on every data set; ``exact_match`` is added for image+text data."""
MAX_ANSWER_TOKENS = 64


@dataclass(frozen=True)
class Evaluation:
    """Static and adaptive quality on one data set, and the adaptive run's sparsity."""

    tokens: int
    nll_static: float
    nll_adaptive: float
    agreement: float
    kl: float
    sparsity: float
    exact_match: float | None = None
    """Share of samples with identical greedy answers; `None` for token-block data."""
    modality_sparsity: dict[str, float] | None = None
    """Sparsity over the tokens of each modality (vision-language models only)."""

    def retention(self, metric: Metric) -> float:
        if metric == "nll":
            return math.exp(self.nll_static - self.nll_adaptive)
        if metric == "agreement":
            return self.agreement
        if metric == "kl":
            return math.exp(-self.kl)
        if metric == "exact_match":
            if self.exact_match is None:
                raise ValueError("exact_match retention needs image+text data with answers")
            return self.exact_match
        raise ValueError(f"unknown retention metric {metric!r}; expected one of {', '.join(METRICS)}, exact_match")

    def to_json(self) -> dict:
        data = {key: value for key, value in self.__dict__.items() if value is not None}
        metrics = METRICS + (("exact_match",) if self.exact_match is not None else ())
        data["retention"] = {metric: self.retention(metric) for metric in metrics}
        return data


def forward_module(model):
    """Return the module that runs a forward pass for `model` (the thinker for Qwen3-Omni)."""
    from gemoe_cli.vlm import forward_module as vlm_forward_module

    return vlm_forward_module(model) if hasattr(model, "config") else model


def floating_inputs_as(inputs: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return `inputs` with floating-point tensors (pixel values) in the dtype of `module`'s first parameter.

    Processors choose the dtype of pixel values themselves (float32 for most, bfloat16 for Llama 4's image
    processor in transformers 5.23), and not every vision tower casts them to its weights' dtype.
    """
    dtype = next(module.parameters()).dtype
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}


def model_forward(model, batch, **kwargs):
    """Run one batch, token ids (B, L) or a `MultimodalBatch`, without a KV cache; return the model output."""
    module = forward_module(model)
    if isinstance(batch, torch.Tensor):
        return module(input_ids=batch, use_cache=False, **kwargs)
    return module(**floating_inputs_as(batch.inputs, module), use_cache=False, **kwargs)


def _scored_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return next-token logits (N, V) and their target tokens (N,) at the scored positions of one batch."""
    if isinstance(batch, torch.Tensor):
        logits = model_forward(model, batch).logits[:, :-1].float()  # (B, L - 1, V)
        return logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)

    # Only the answer is scored, so only the logits from the token before it on are computed when possible.
    length = batch.input_ids.size(1)
    keep = length - batch.prompt_length + 1
    module = forward_module(model)
    if "logits_to_keep" in inspect.signature(module.forward).parameters:
        logits = model_forward(model, batch, logits_to_keep=keep).logits[:, -keep:]
    else:
        logits = model_forward(model, batch).logits[:, -keep:]
    logits = logits[:, :-1].float()  # (1, answer, V) predicting positions prompt_length .. L - 1
    targets = batch.input_ids[:, batch.prompt_length :]
    return logits.reshape(-1, logits.size(-1)), targets.reshape(-1)


@torch.no_grad()
def evaluate(model, routing, batches: Iterable, progress=None) -> Evaluation:
    """Run each batch statically and adaptively, and compare next-token predictions on its scored tokens.

    `routing` is the `AdaptiveRouting` attached to `model`; its counters are reset and afterwards hold
    the adaptive run's activations. For image+text batches the greedy answers are compared afterwards, in
    generation runs that the counters do not include.
    """
    routing.reset_counters()
    tokens = 0
    nll_static = nll_adaptive = agreeing = kl_sum = 0.0
    device = next(model.parameters()).device
    batches = list(batches)
    for batch in batches:
        batch = batch.to(device)
        with routing.static():
            static_logits, targets = _scored_logits(model, batch)
        static_log_probs = torch.log_softmax(static_logits, dim=-1)  # (N, V)
        adaptive_log_probs = torch.log_softmax(_scored_logits(model, batch)[0], dim=-1)

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
    sparsity = routing.sparsity()
    modality_sparsity = routing.modality_sparsity() or None
    answers = [batch for batch in batches if not isinstance(batch, torch.Tensor)]
    exact_match = answer_agreement(model, routing, answers) if answers else None
    return Evaluation(
        tokens=tokens,
        nll_static=nll_static / tokens,
        nll_adaptive=nll_adaptive / tokens,
        agreement=agreeing / tokens,
        kl=kl_sum / tokens,
        sparsity=sparsity,
        exact_match=exact_match,
        modality_sparsity=modality_sparsity,
    )


@torch.no_grad()
def greedy_answer(model, batch, max_new_tokens: int) -> torch.Tensor:
    """Generate the greedy answer to a `MultimodalBatch`'s prompt; return the new token ids (1, n)."""
    module = forward_module(model)
    prompt = floating_inputs_as(batch.prompt_inputs(), module)
    tokenizer_pad = getattr(getattr(module, "generation_config", None), "pad_token_id", None)
    output = module.generate(
        **prompt,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer_pad if tokenizer_pad is not None else getattr(module.config, "eos_token_id", None),
    )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return sequences[:, prompt["input_ids"].size(1) :]


def answer_agreement(model, routing, batches: list) -> float:
    """Return the share of samples whose greedy answers under static and adaptive routing are identical.

    Generation runs do not count towards the routing counters, which keep describing the scored passes.
    """
    device = next(model.parameters()).device
    matches = 0
    with routing.uncounted():
        for batch in batches:
            batch = batch.to(device)
            length = max(1, min(batch.answer_length, MAX_ANSWER_TOKENS))
            with routing.static():
                static_answer = greedy_answer(model, batch, length)
            adaptive_answer = greedy_answer(model, batch, length)
            matches += int(torch.equal(static_answer, adaptive_answer))
    return matches / len(batches)


@torch.no_grad()
def mean_nll(model, batches: Iterable) -> float:
    """Return the mean next-token NLL of `model` as it routes now, over the scored tokens of `batches`."""
    total = 0.0
    tokens = 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        logits, targets = _scored_logits(model, batch)
        log_probs = torch.log_softmax(logits, dim=-1)
        total -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        tokens += targets.numel()
    return total / max(tokens, 1)
