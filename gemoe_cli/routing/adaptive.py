"""The adaptive router: attach gating-entropy routing to a model's MoE blocks and count what it does.

For each MoE block, a forward hook on the router keeps its raw scores, and a forward pre-hook on the
experts rewrites the static top-K selection before any expert runs:

    router(hidden) -> scores (T, E), weights (T, K), index (T, K)
    H = entropy(gating distribution)        k = policy(H)
    keep the k slots with the best selection score; dropped slots -> sentinel E (or weight 0)

Vision-language models can route image and text tokens with separate thresholds: a `ModalityTracker`
(`gemoe_cli.routing.modality`) keeps each token's modality, and a layer with thresholds for that modality
uses them; every other token uses the layer's shared thresholds.

Everything attached is removed by `AdaptiveRouting.remove()`, which also works as a context manager.

Legend for shape comments: T tokens, E experts, K slots of the static selection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType

import torch

from gemoe_cli.routing.discovery import MoEBlock, find_moe_blocks, selection_bias_source
from gemoe_cli.routing.dispatch import EXPERTS_IMPLEMENTATION, register_experts_implementation, sparse_experts_forward
from gemoe_cli.routing.families import BIAS_NAMES
from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores
from gemoe_cli.routing.modality import (
    MODALITIES,
    ModalityTracker,
    block_modality,
    install_modality_tracker,
    modality_code,
)
from gemoe_cli.routing.policy import experts_per_token, validate_thresholds
from gemoe_cli.routing.selection import Renormalize, rank_slots, truncate_selection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCounters:
    """Activation counts of one MoE layer since the last reset."""

    tokens: int
    active_pairs: int
    k_histogram: list[int]
    """Tokens that engaged exactly ``i`` experts, for ``i`` in ``0..k_max``."""
    nonfinite_tokens: int
    """Tokens whose router scores were not finite; they engage ``k_max`` experts."""
    modality_k_histograms: dict[str, list[int]] = field(default_factory=dict)
    """`k_histogram` of the tokens of each modality seen (vision-language models only)."""

    def modality_tokens(self, modality: str) -> int:
        """Return the number of tokens of one modality (0 when none was seen)."""
        return sum(self.modality_k_histograms.get(modality, []))

    def modality_active_pairs(self, modality: str) -> int:
        """Return the expert activations of the tokens of one modality."""
        return sum(k * count for k, count in enumerate(self.modality_k_histograms.get(modality, [])))


@dataclass(frozen=True)
class RoutingEvent:
    """What one MoE layer decided for one batch of tokens, passed to observers (calibration)."""

    path: str
    distribution: torch.Tensor  # (T, E) gating distribution
    entropy: torch.Tensor  # (T,) gating entropy in nats
    slot_ranks: torch.Tensor  # (T, K) rank of each static slot by selection score
    top_k_weights: torch.Tensor  # (T, K) static routing weights
    k: torch.Tensor  # (T,) experts engaged under the current thresholds
    modality: torch.Tensor | None = None  # (T,) modality codes (`gemoe_cli.routing.modality`), or None if unknown


Observer = Callable[[RoutingEvent], None]


class AdaptiveLayer:
    """Adaptive routing state of one MoE block: thresholds, counters and the hooks that apply them."""

    def __init__(self, moe: MoEBlock, thresholds: Sequence[float], k_min: int, k_max: int, renormalize: Renormalize):
        validate_thresholds(thresholds, k_min, k_max, where=f"layers[{moe.path}].thresholds")
        if k_max > moe.top_k:
            raise ValueError(f"k_max={k_max} is greater than the static top-k K={moe.top_k} of {moe.path}")
        self.moe = moe
        self.k_min = k_min
        self.k_max = k_max
        self.renormalize = renormalize
        self.scoring = moe.scoring
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float32)
        self.modality_thresholds: dict[int, torch.Tensor] = {}
        """Thresholds by modality code; tokens of other modalities (or of unknown modality) use `thresholds`."""
        self.fixed_modality = block_modality(moe.path)
        """The one modality this block routes (vision-tower and Ernie vision/text expert blocks), or None."""
        self.tracker: ModalityTracker | None = None
        """Token modalities of the forward pass in progress, for blocks that route mixed sequences."""
        self.observers: list[Observer] = []
        self.enabled = True
        """With `False` the layer routes statically (observers still see every batch, with k = K)."""
        self.counting = True
        """With `False` the counters ignore the batches routed (see `AdaptiveRouting.uncounted`)."""
        self.baseline = None
        """A baseline policy (`gemoe_cli.routing.baselines`) that replaces the entropy thresholds when set."""
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Found once, because searching the router and the block on every call adds microseconds to each decode step.
        self._bias_source = selection_bias_source(moe.block, moe.router)
        self.reset_counters()

    @property
    def path(self) -> str:
        return self.moe.path

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        validate_thresholds(thresholds, self.k_min, self.k_max, where=f"layers[{self.path}].thresholds")
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float32)

    def set_modality_thresholds(self, thresholds: Mapping[str, Sequence[float]]) -> None:
        """Replace the per-modality thresholds (modality name -> thresholds); an empty mapping removes them."""
        parsed = {}
        for name, values in thresholds.items():
            validate_thresholds(values, self.k_min, self.k_max, where=f"layers[{self.path}].modalities[{name}]")
            parsed[modality_code(name)] = torch.tensor(list(values), dtype=torch.float32)
        self.modality_thresholds = parsed

    def reset_counters(self) -> None:
        self._k_histogram = torch.zeros(self.k_max + 1, dtype=torch.int64)
        self._nonfinite = torch.zeros((), dtype=torch.int64)
        self._modality_histogram = torch.zeros((len(MODALITIES), self.k_max + 1), dtype=torch.int64)

    def counters(self) -> LayerCounters:
        histogram = self._k_histogram.tolist()
        by_modality = {MODALITIES[code]: row for code, row in enumerate(self._modality_histogram.tolist()) if any(row)}
        return LayerCounters(
            tokens=sum(histogram),  # Every counted token adds one to exactly one bin.
            active_pairs=sum(k * count for k, count in enumerate(histogram)),
            k_histogram=histogram,
            nonfinite_tokens=int(self._nonfinite),
            modality_k_histograms=by_modality,
        )

    def token_modalities(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Return the modality code of each of the `num_tokens` tokens being routed (T,), or None if unknown."""
        if self.fixed_modality is not None:
            return torch.full((num_tokens,), self.fixed_modality, dtype=torch.int64, device=device)
        if self.tracker is None:
            return None
        codes = self.tracker.codes_for(num_tokens)
        return None if codes is None else codes.to(device)

    # Hooks -----------------------------------------------------------------------------------------

    def on_router_output(self, router, args, kwargs, output) -> None:
        position = self.moe.adapter.logits_position
        scores = output if position is None else output[position]
        self._pending = (scores.detach(), self._selection_bias(args, kwargs))

    def on_experts_call(self, experts, args, kwargs):
        hidden_states, top_k_index, top_k_weights, rebuild = _split_experts_arguments(args, kwargs)
        if self._pending is None:
            logger.warning("router of %s did not run before its experts; routing left static", self.path)
            return None
        scores, bias = self._pending
        self._pending = None
        index, weights = self.route(scores.reshape(-1, scores.size(-1)), bias, top_k_index, top_k_weights)
        return rebuild(hidden_states, index, weights)

    def route(self, scores, bias, top_k_index, top_k_weights):
        """Rewrite one batch's static selection (T, K) given the router's raw scores (T, E)."""
        distribution = gating_distribution(scores, self.scoring)  # (T, E)
        entropy = gating_entropy(distribution)  # (T,)
        nonfinite = ~torch.isfinite(scores).all(dim=-1)
        entropy = entropy.masked_fill(nonfinite, float("nan"))
        modality = self.token_modalities(entropy.size(0), entropy.device)  # (T,) or None
        k = experts_per_token(entropy, self.thresholds, self.k_min, self.k_max)  # (T,)
        if modality is not None:
            for code, thresholds in self.modality_thresholds.items():
                k_modality = experts_per_token(entropy, thresholds, self.k_min, self.k_max)
                k = torch.where(modality == code, k_modality, k)

        safe_index = top_k_index.clamp(0, scores.size(-1) - 1)
        if self.moe.adapter.bias_on_logits and bias is not None:
            ranking = scores.float() + bias.float()
        else:
            ranking = selection_scores(scores, self.scoring, bias)
        slot_scores = ranking.gather(-1, safe_index)  # (T, K)
        ranks = rank_slots(slot_scores)
        if self.baseline is not None:
            ranked = torch.zeros_like(slot_scores).scatter_(-1, ranks, distribution.gather(-1, safe_index))
            baseline_k = self.baseline.experts_per_token(torch.nan_to_num(ranked, nan=1.0), self.k_min, self.k_max)
            k = torch.where(nonfinite, k, baseline_k)
        if not self.enabled:
            k = torch.full_like(k, top_k_index.size(-1))

        if self.observers:
            event = RoutingEvent(self.path, distribution, entropy, ranks, top_k_weights, k, modality)
            for observer in self.observers:
                observer(event)
        if not self.enabled:
            return top_k_index, top_k_weights

        if self.counting:
            self._count(k, nonfinite, modality)
        dropped = (
            self.moe.num_experts if _skips_sentinel(self.moe.experts) else _best_slot_index(top_k_index, slot_scores)
        )
        return truncate_selection(top_k_index, top_k_weights, slot_scores, k, self.renormalize, dropped, ranks)

    def _selection_bias(self, args, kwargs) -> torch.Tensor | None:
        if self.moe.adapter.bias_from_argument:
            for name in BIAS_NAMES:
                if isinstance(kwargs.get(name), torch.Tensor):
                    return kwargs[name]
            return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        return None if self._bias_source is None else getattr(*self._bias_source)

    def _count(self, k: torch.Tensor, nonfinite: torch.Tensor, modality: torch.Tensor | None) -> None:
        device = k.device
        if self._k_histogram.device != device:
            self._k_histogram, self._nonfinite, self._modality_histogram = (
                t.to(device) for t in (self._k_histogram, self._nonfinite, self._modality_histogram)
            )
        self._k_histogram += torch.bincount(k, minlength=self.k_max + 1)[: self.k_max + 1]
        self._nonfinite += nonfinite.sum()
        if modality is not None:
            # One bincount over (modality, k) pairs fills the whole (M, k_max + 1) table.
            width = self.k_max + 1
            pairs = torch.bincount(modality * width + k, minlength=len(MODALITIES) * width)
            self._modality_histogram += pairs[: len(MODALITIES) * width].view(len(MODALITIES), width)


def _best_slot_index(top_k_index: torch.Tensor, slot_scores: torch.Tensor) -> torch.Tensor:
    # Implementations that cannot skip the sentinel get a valid expert with weight 0 instead.
    best = torch.nan_to_num(slot_scores, nan=float("-inf")).argmax(dim=-1, keepdim=True)  # (T, 1)
    return top_k_index.gather(-1, best).expand_as(top_k_index)


def _skips_sentinel(experts: torch.nn.Module) -> bool:
    if getattr(experts, "_gemoe_patched", False):
        return True
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION


def _split_experts_arguments(args, kwargs):
    """Find (hidden_states, top_k_index, top_k_weights) in an experts call and a way to put them back."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[name] for name in names[len(args[:3]) :]]
    positional = len(args[:3])

    def rebuild(hidden_states, index, weights):
        new = (hidden_states, index, weights)
        new_args = tuple(new[:positional]) + tuple(args[3:])
        new_kwargs = dict(kwargs)
        for name, value in zip(names[positional:], new[positional:], strict=True):
            new_kwargs[name] = value
        return new_args, new_kwargs

    return values[0], values[1], values[2], rebuild


class AdaptiveRouting:
    """Adaptive routing attached to a model; `remove()` (or leaving the `with` block) restores it."""

    def __init__(self, model: torch.nn.Module, layers: dict[str, AdaptiveLayer]):
        self.model = model
        self.layers = layers
        self._undo: list[Callable[[], None]] = []

    def counters(self) -> dict[str, LayerCounters]:
        return {path: layer.counters() for path, layer in self.layers.items()}

    def reset_counters(self) -> None:
        for layer in self.layers.values():
            layer.reset_counters()

    def sparsity(self) -> float:
        """Return the expert-activation sparsity since the last reset: 1 - active pairs / (K x tokens)."""
        active = static = 0
        for layer in self.layers.values():
            counts = layer.counters()
            active += counts.active_pairs
            static += layer.moe.top_k * counts.tokens
        return 1.0 - active / static if static else 0.0

    def modality_sparsity(self) -> dict[str, float]:
        """Return the sparsity since the last reset over the tokens of each modality seen (empty for text models)."""
        active: dict[str, int] = {}
        static: dict[str, int] = {}
        for layer in self.layers.values():
            counts = layer.counters()
            for name in counts.modality_k_histograms:
                active[name] = active.get(name, 0) + counts.modality_active_pairs(name)
                static[name] = static.get(name, 0) + layer.moe.top_k * counts.modality_tokens(name)
        return {name: 1.0 - active[name] / static[name] for name in MODALITIES if static.get(name)}

    @contextmanager
    def static(self):
        """Route statically inside the block (for a reference run), then restore the previous state."""
        previous = {path: layer.enabled for path, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield self
        finally:
            for path, layer in self.layers.items():
                layer.enabled = previous[path]

    @contextmanager
    def uncounted(self):
        """Leave the counters untouched by what runs inside the block (generation for answer checks)."""
        previous = {path: layer.counting for path, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.counting = False
        try:
            yield self
        finally:
            for path, layer in self.layers.items():
                layer.counting = previous[path]

    def set_thresholds(self, thresholds: Mapping[str, Sequence[float]]) -> None:
        """Replace the thresholds of the named layers."""
        for path, values in thresholds.items():
            self.layers[path].set_thresholds(values)

    def set_modality_thresholds(self, thresholds: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
        """Replace the per-modality thresholds of the named layers (path -> modality name -> thresholds)."""
        for path, by_modality in thresholds.items():
            self.layers[path].set_modality_thresholds(by_modality)

    @property
    def tracks_modality(self) -> bool:
        """Whether the modality of routed tokens is known (a vision-language model)."""
        return any(layer.tracker is not None or layer.fixed_modality is not None for layer in self.layers.values())

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> AdaptiveRouting:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def attach_adaptive_routing(
    model: torch.nn.Module,
    thresholds: Mapping[str, Sequence[float]],
    *,
    k_min: int = 1,
    k_max: int | None = None,
    renormalize: Renormalize = "preserve_mass",
    sparse_dispatch: bool = True,
    modality_thresholds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> AdaptiveRouting:
    """Attach adaptive routing to every MoE block of `model` (in place) and return the handle.

    Args:
        thresholds: per-layer thresholds keyed by MoE block path; a missing layer gets all ``-inf``
            thresholds, which keeps its static top-k routing.
        k_min, k_max: bounds on experts per token; ``k_max`` defaults to each layer's static K.
        renormalize: ``preserve_mass`` or ``none``.
        sparse_dispatch: switch experts to ``gemoe_sparse`` so dropped slots cost no compute; with
            `False`, the model's current experts implementation runs and dropped slots get weight 0.
        modality_thresholds: per-layer thresholds by modality name (``text``, ``image``, ``video``,
            ``audio``) for vision-language models; tokens of a modality without its own list use the
            layer's `thresholds`.
    """
    blocks = find_moe_blocks(model)
    unknown = sorted(set(thresholds) - {block.path for block in blocks})
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a MoE block of this model ({len(blocks)} MoE blocks found)")

    layers = {}
    for block in blocks:
        layer_k_max = block.top_k if k_max is None else k_max
        layer_thresholds = thresholds.get(block.path, [float("-inf")] * (layer_k_max - k_min))
        layers[block.path] = AdaptiveLayer(block, layer_thresholds, k_min, layer_k_max, renormalize)

    unknown = sorted(set(modality_thresholds or {}) - set(layers))
    if unknown:
        raise ValueError(f"{unknown[0]!r} has modality thresholds but is not a MoE block of this model")
    for path, by_modality in (modality_thresholds or {}).items():
        layers[path].set_modality_thresholds(by_modality)

    routing = AdaptiveRouting(model, layers)
    try:
        tracker = install_modality_tracker(model, routing._undo)
        for layer in layers.values():
            layer.tracker = tracker
        if sparse_dispatch:
            _switch_to_sparse_dispatch(model, blocks, routing._undo)
        for layer in layers.values():
            _install_hooks(layer, routing._undo)
    except BaseException:
        routing.remove()
        raise
    logger.info("adaptive routing attached to %d MoE blocks", len(layers))
    return routing


def _install_hooks(layer: AdaptiveLayer, undo: list) -> None:
    moe = layer.moe
    router_handle = moe.router.register_forward_hook(layer.on_router_output, with_kwargs=True)
    undo.append(router_handle.remove)
    experts_handle = moe.experts.register_forward_pre_hook(layer.on_experts_call, with_kwargs=True)
    undo.append(experts_handle.remove)

    if moe.adapter.block_forward is not None:
        # Blocks that never call their experts with a top-k selection get a forward that does.
        _patch_instance(moe.block, "forward", MethodType(moe.adapter.block_forward, moe.block), undo)
        _patch_experts_forward(moe, undo)


def _switch_to_sparse_dispatch(model, blocks: list[MoEBlock], undo: list) -> None:
    if any(hasattr(block.experts, "has_gate") for block in blocks) and hasattr(model, "set_experts_implementation"):
        register_experts_implementation()
        previous = model.get_experts_implementation()
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        undo.append(lambda: model.set_experts_implementation(previous))
    for block in blocks:
        if not hasattr(block.experts, "has_gate"):
            _patch_experts_forward(block, undo)


def _patch_experts_forward(moe: MoEBlock, undo: list) -> None:
    experts = moe.experts
    if getattr(experts, "_gemoe_patched", False):
        return
    _patch_instance(experts, "forward", MethodType(sparse_experts_forward, experts), undo)
    _patch_instance(experts, "_gemoe_patched", True, undo)
    _patch_instance(experts, "_gemoe_expert_forward", moe.adapter.expert_forward, undo)
    _patch_instance(experts, "_gemoe_input_scaled", bool(moe.adapter.extra.get("input_scaled")), undo)


def _patch_instance(module: torch.nn.Module, name: str, value, undo: list) -> None:
    module.__dict__[name] = value
    undo.append(lambda: module.__dict__.pop(name, None))
