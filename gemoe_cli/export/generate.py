"""Greedy generation over an exported ``model.onnx`` in onnxruntime, one KV-cache step per token.

    from gemoe_cli.export.generate import greedy_generate
    tokens = greedy_generate("out/olmoe-onnx/model.onnx", input_ids, max_new_tokens=20, eos_token_id=2)

The first step runs the prompt with an empty past. Every later step feeds one token per row together
with the previous step's present keys and values. Like transformers' greedy `generate`, a row that produced
`eos_token_id` continues with `pad_token_id`, and generation stops early once every row has finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemoe_cli.errors import InvalidInputError
from gemoe_cli.export import decoder

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for item in session.get_inputs():
        if not item.name.startswith("past_key_values."):
            continue
        _, heads, _, head_dim = item.shape
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise InvalidInputError(f"input {item.name} has shape {item.shape}; expected static heads and head size.")
        past[item.name] = np.zeros((batch, heads, 0, head_dim), dtype=_NUMPY_TYPES.get(item.type, np.float32))
    return past


def greedy_generate(
    model,
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: np.ndarray | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Return the prompt (B, S) followed by up to `max_new_tokens` greedy tokens per row, as int64.

    Args:
        model: an onnxruntime `InferenceSession` or the path of an exported ``model.onnx``.
        input_ids: (B, S) prompt ids; left-pad rows of different lengths and mark pads in `attention_mask`.
        attention_mask: (B, S), 1 for real tokens; all ones when omitted.
        eos_token_id: id that finishes a row; `None` generates exactly `max_new_tokens`.
        pad_token_id: id appended to finished rows; defaults to `eos_token_id`.
    """
    if isinstance(model, (str, Path)):
        from gemoe_cli.export.validate import create_session

        model = create_session(Path(model))
    session = model
    if max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens={max_new_tokens} is invalid; use 0 or more.")
    tokens = np.asarray(input_ids, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise InvalidInputError(f"input_ids has shape {tokens.shape}; expected (batch, sequence) with sequence >= 1.")
    batch = tokens.shape[0]
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    pad = eos_token_id if pad_token_id is None else pad_token_id

    declared = {item.name for item in session.get_inputs()}
    present_names = [item.name for item in session.get_outputs() if item.name.startswith("present.")]
    past = _empty_past(session, batch)
    step_ids = tokens
    unfinished = np.ones(batch, dtype=bool)
    for _ in range(max_new_tokens):
        past_length = tokens.shape[1] - step_ids.shape[1]
        positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)[:, past_length:]
        feeds = {decoder.INPUT_IDS: step_ids, decoder.ATTENTION_MASK: mask, decoder.POSITION_IDS: positions, **past}
        outputs = session.run([decoder.LOGITS, *present_names], {k: v for k, v in feeds.items() if k in declared})

        next_tokens = outputs[0][:, -1, :].argmax(axis=-1).astype(np.int64)  # (B,)
        if eos_token_id is not None:
            next_tokens = np.where(unfinished, next_tokens, pad)
            unfinished &= next_tokens != eos_token_id
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        past = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in zip(present_names, outputs[1:], strict=True)
        }
        step_ids = next_tokens[:, None]
        if eos_token_id is not None and not unfinished.any():
            break
    return tokens
