"""The adaptive router: attach gating-entropy routing to a model's MoE blocks and count what it does.

For each MoE block, a forward hook on the router keeps its raw scores, and a forward pre-hook on the
experts rewrites the static top-K selection before any expert runs:

    router(hidden) -> scores (T, E), weights (T, K), index (T, K)
    H = entropy(gating distribution)        k = policy(H)
    keep the k slots with the best selection score; dropped slots -> sentinel E (or weight 0)

Everything attached is removed by `AdaptiveRouting.remove()`, which also works as a context manager.

Legend for shape comments: T tokens, E experts, K slots of the static selection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch

from gemoe_cli.routing.discovery import MoEBlock, find_moe_blocks, static_selection_bias
from gemoe_cli.routing.dispatch import EXPERTS_IMPLEMENTATION, register_experts_implementation, sparse_experts_forward
from gemoe_cli.routing.families import BIAS_NAMES
from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores
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


@dataclass(frozen=True)
class RoutingEvent:
    """What one MoE layer decided for one batch of tokens, passed to observers (calibration)."""

    path: str
    distribution: torch.Tensor  # (T, E) gating distribution
    entropy: torch.Tensor  # (T,) gating entropy in nats
    slot_ranks: torch.Tensor  # (T, K) rank of each static slot by selection score
    top_k_weights: torch.Tensor  # (T, K) static routing weights
    k: torch.Tensor  # (T,) experts engaged under the current thresholds


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
        self.observers: list[Observer] = []
        self.enabled = True
        """With `False` the layer routes statically (observers still see every batch, with k = K)."""
        self.baseline = None
        """A baseline policy (`gemoe_cli.routing.baselines`) that replaces the entropy thresholds when set."""
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.reset_counters()

    @property
    def path(self) -> str:
        return self.moe.path

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        validate_thresholds(thresholds, self.k_min, self.k_max, where=f"layers[{self.path}].thresholds")
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float32)

    def reset_counters(self) -> None:
        self._tokens = torch.zeros((), dtype=torch.int64)
        self._k_histogram = torch.zeros(self.k_max + 1, dtype=torch.int64)
        self._nonfinite = torch.zeros((), dtype=torch.int64)

    def counters(self) -> LayerCounters:
        histogram = self._k_histogram.tolist()
        return LayerCounters(
            tokens=int(self._tokens),
            active_pairs=sum(k * count for k, count in enumerate(histogram)),
            k_histogram=histogram,
            nonfinite_tokens=int(self._nonfinite),
        )

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
        entropy = torch.where(nonfinite, torch.full_like(entropy, float("nan")), entropy)
        k = experts_per_token(entropy, self.thresholds, self.k_min, self.k_max)  # (T,)

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
            event = RoutingEvent(self.path, distribution, entropy, ranks, top_k_weights, k)
            for observer in self.observers:
                observer(event)
        if not self.enabled:
            return top_k_index, top_k_weights

        self._count(k, nonfinite)
        dropped = (
            self.moe.num_experts if _skips_sentinel(self.moe.experts) else _best_slot_index(top_k_index, slot_scores)
        )
        return truncate_selection(top_k_index, top_k_weights, slot_scores, k, self.renormalize, dropped)

    def _selection_bias(self, args, kwargs) -> torch.Tensor | None:
        if self.moe.adapter.bias_from_argument:
            for name in BIAS_NAMES:
                if isinstance(kwargs.get(name), torch.Tensor):
                    return kwargs[name]
            return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        return static_selection_bias(self.moe.block, self.moe.router)

    def _count(self, k: torch.Tensor, nonfinite: torch.Tensor) -> None:
        device = k.device
        if self._k_histogram.device != device:
            self._tokens, self._k_histogram, self._nonfinite = (
                t.to(device) for t in (self._tokens, self._k_histogram, self._nonfinite)
            )
        self._tokens += k.numel()
        self._k_histogram += torch.bincount(k, minlength=self.k_max + 1)[: self.k_max + 1]
        self._nonfinite += nonfinite.sum()


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

    def set_thresholds(self, thresholds: Mapping[str, Sequence[float]]) -> None:
        """Replace the thresholds of the named layers."""
        for path, values in thresholds.items():
            self.layers[path].set_thresholds(values)

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
) -> AdaptiveRouting:
    """Attach adaptive routing to every MoE block of `model` (in place) and return the handle.

    Args:
        thresholds: per-layer thresholds keyed by MoE block path; a missing layer gets all ``-inf``
            thresholds, which keeps its static top-k routing.
        k_min, k_max: bounds on experts per token; ``k_max`` defaults to each layer's static K.
        renormalize: ``preserve_mass`` or ``none``.
        sparse_dispatch: switch experts to ``gemoe_sparse`` so dropped slots cost no compute; with
            `False`, the model's current experts implementation runs and dropped slots get weight 0.
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

    routing = AdaptiveRouting(model, layers)
    try:
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
