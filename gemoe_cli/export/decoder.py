"""The exported signature: a causal LM step with an explicit KV cache, as flat tensors.

Inputs and outputs of ``model.onnx`` (L decoder layers, B batch, S new tokens, P past tokens):

| name | shape | dtype |
| --- | --- | --- |
| ``input_ids`` | (B, S) | int64 |
| ``attention_mask`` | (B, P + S) | int64, 1 for real tokens |
| ``position_ids`` | (B, S) | int64 |
| ``past_key_values.{i}.key`` / ``.value`` | (B, H_kv, P, head_dim) | float32 |
| ``logits`` | (B, S, vocab) | float32 |
| ``present.{i}.key`` / ``.value`` | (B, H_kv, P + S, head_dim) | float32 |
| ``expert_activations`` (optional) | (number of MoE layers,) | int64 |

``expert_activations`` counts the active (token, expert) pairs of each MoE layer in this call: the sum
of ``k`` over all B x S tokens, padding included, as `AdaptiveRouting.counters()` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemoe_cli.errors import UnsupportedModelError

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
EXPERT_ACTIVATIONS = "expert_activations"

BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"
PAST_DIM = "past_sequence"
TOTAL_DIM = "total_sequence"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass(frozen=True)
class CacheLayout:
    """Per decoder layer, the (heads, head_dim) of the cached keys and of the cached values."""

    keys: tuple[tuple[int, int], ...]
    values: tuple[tuple[int, int], ...]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def empty_past(self, batch: int, past: int = 0, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return zero-filled past keys and values with `past` positions (0: an empty past)."""
        return [
            (torch.zeros(batch, kh, past, kd, dtype=dtype), torch.zeros(batch, vh, past, vd, dtype=dtype))
            for (kh, kd), (vh, vd) in zip(self.keys, self.values, strict=True)
        ]

    def as_json(self) -> list[dict]:
        return [
            {"key": [BATCH_DIM, kh, PAST_DIM, kd], "value": [BATCH_DIM, vh, PAST_DIM, vd]}
            for (kh, kd), (vh, vd) in zip(self.keys, self.values, strict=True)
        ]


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """Run two tokens through `model` and read the shape of its KV cache.

    Raises:
        UnsupportedModelError: the cache is not a list of full-attention key/value layers (sliding
            windows, linear attention and state-space layers are not exported).
    """
    vocab = model.config.get_text_config().vocab_size
    ids = torch.full((1, 2), min(3, vocab - 1), dtype=torch.long)
    with torch.no_grad():
        output = model(input_ids=ids, use_cache=True)
    cache = getattr(output, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} returned no KV cache; ONNX export needs one.")
    keys, values = [], []
    for number, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind != "DynamicLayer" or getattr(layer, "keys", None) is None:
            description = f"a {kind}" if kind != "DynamicLayer" else "a DynamicLayer without keys (not full attention)"
            raise UnsupportedModelError(
                f"cache layer {number} of {type(model).__name__} is {description}; ONNX export supports "
                "full-attention key/value caches only."
            )
        keys.append((layer.keys.shape[1], layer.keys.shape[3]))
        values.append((layer.values.shape[1], layer.values.shape[3]))
    return CacheLayout(tuple(keys), tuple(values))


class DecoderWithCache(torch.nn.Module):
    """A causal LM with the flat KV-cache signature above; `recorder` adds ``expert_activations``."""

    def __init__(self, model: torch.nn.Module, recorder=None):
        super().__init__()
        self.model = model
        self.recorder = recorder

    def forward(
        self, input_ids, attention_mask, position_ids, past_key_values: list[tuple[torch.Tensor, torch.Tensor]]
    ):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(past_key_values), config=self.model.config)
        if self.recorder is not None:
            self.recorder.clear()
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        if self.recorder is None:
            return output.logits, present
        return output.logits, present, self.recorder.active_pairs()


def input_names(layout: CacheLayout) -> list[str]:
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for layer in range(layout.num_layers):
        names.extend(past_names(layer))
    return names


def output_names(layout: CacheLayout, activation_counts: bool) -> list[str]:
    names = [LOGITS]
    for layer in range(layout.num_layers):
        names.extend(present_names(layer))
    if activation_counts:
        names.append(EXPERT_ACTIVATIONS)
    return names


def step_inputs(
    input_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Return the (input_ids, attention_mask, position_ids, past) arguments of one step.

    Without a mask every position is a real token. Positions count real tokens only, so a left-padded
    row starts at position 0 as in transformers' generate.
    """
    batch, sequence = input_ids.shape
    past_length = past[0][0].shape[2] if past else 0
    if attention_mask is None:
        attention_mask = torch.ones(batch, past_length + sequence, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, past_length:]
    return input_ids, attention_mask, position_ids.contiguous(), past
