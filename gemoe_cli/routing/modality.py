"""Token modality: which tokens of a forward pass are image, video or audio placeholders, and which are text.

Vision-language models put one placeholder token per image feature into ``input_ids`` (``image_token_id`` and
its kin in the config) and replace their embeddings with the vision tower's output. A `ModalityTracker`
reads ``input_ids`` when the model's forward starts and keeps one modality code per token, flattened in the
(B, S) order that MoE blocks see after ``hidden_states.reshape(-1, D)``. Start and end markers around an
image count as text.

Some MoE blocks see only one modality, whatever the input. Those inside a vision tower (dots3_note) route
image patches. Ernie 4.5 VL splits each decoder MoE layer into ``text_moe`` and ``vision_moe``, which route
the text and the vision (image and video) tokens. `block_modality` names them from the block path.

Legend for shape comments: B sequences, S tokens per sequence, T = B x S tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

MODALITIES = ("text", "image", "video", "audio")
"""Modality names; a token's modality code is its index here."""
TEXT, IMAGE, VIDEO, AUDIO = range(len(MODALITIES))

_PLACEHOLDER_NAMES = {
    IMAGE: ("image_token_id", "image_token_index"),
    VIDEO: ("video_token_id", "video_token_index"),
    AUDIO: ("audio_token_id", "audio_token_index"),
}
_SUB_CONFIG_NAMES = ("thinker_config",)


def modality_code(name: str) -> int:
    """Return the code of a modality name, or raise `ValueError` naming the known ones."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}")
    return MODALITIES.index(name)


def placeholder_token_ids(config) -> dict[int, tuple[int, ...]]:
    """Return the placeholder token ids of each non-text modality that the config declares (may be empty)."""
    owners = [config] + [getattr(config, name) for name in _SUB_CONFIG_NAMES if getattr(config, name, None)]
    found: dict[int, tuple[int, ...]] = {}
    for code, names in _PLACEHOLDER_NAMES.items():
        ids = set()
        for owner in owners:
            for name in names:
                value = getattr(owner, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    ids.add(value)
        if ids:
            found[code] = tuple(sorted(ids))
    return found


def token_modalities(input_ids: torch.Tensor, placeholders: dict[int, tuple[int, ...]]) -> torch.Tensor:
    """Return the modality code of each token (B, S) -> (B, S) as int64; tokens that are no placeholder are text."""
    codes = torch.full_like(input_ids, TEXT, dtype=torch.int64)
    for code, ids in placeholders.items():
        matches = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device, dtype=input_ids.dtype))
        codes = torch.where(matches, torch.full_like(codes, code), codes)
    return codes


def block_modality(path: str) -> int | None:
    """Return the one modality a MoE block routes, from its path, or `None` when it routes a mixed sequence."""
    for part in path.split("."):
        if part == "text_moe":
            return TEXT
        if part == "visual" or part.startswith("vision"):
            return IMAGE
    return None


class ModalityTracker:
    """Keeps the modality code of each token of the forward pass in progress, read from ``input_ids``.

    The outermost module whose forward gets ``input_ids`` sets the codes, and they are cleared when that
    forward returns or raises, so a later call never reads stale codes.
    """

    def __init__(self, placeholders: dict[int, tuple[int, ...]]):
        self.placeholders = placeholders
        self.codes: torch.Tensor | None = None  # (T,)
        self._owner: torch.nn.Module | None = None

    def codes_for(self, num_tokens: int) -> torch.Tensor | None:
        """Return the codes (T,) when the forward in progress has `num_tokens` tokens, else `None`."""
        if self.codes is not None and self.codes.numel() == num_tokens:
            return self.codes
        return None

    def on_forward_start(self, module, args, kwargs) -> None:
        if self._owner is not None:
            return
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        if not isinstance(input_ids, torch.Tensor):
            return
        self.codes = token_modalities(input_ids, self.placeholders).reshape(-1)
        self._owner = module

    def on_forward_end(self, module, args, kwargs, output) -> None:
        if module is self._owner:
            self.codes = None
            self._owner = None


def install_modality_tracker(model: torch.nn.Module, undo: list[Callable[[], None]]) -> ModalityTracker | None:
    """Attach a `ModalityTracker` to every module of `model` that takes ``input_ids``; `None` for text-only models.

    Hook removers are appended to `undo`.
    """
    placeholders = placeholder_token_ids(getattr(model, "config", None))
    if not placeholders:
        return None
    tracker = ModalityTracker(placeholders)
    for module in model.modules():
        if module is not model and getattr(module, "config", None) is None:
            continue
        if "input_ids" not in inspect.signature(module.forward).parameters:
            continue
        start = module.register_forward_pre_hook(tracker.on_forward_start, with_kwargs=True)
        end = module.register_forward_hook(tracker.on_forward_end, with_kwargs=True, always_call=True)
        undo.extend((start.remove, end.remove))
    return tracker
