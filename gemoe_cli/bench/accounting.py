"""Expert-activation accounting: add up the adaptive layers' counters over runs and report sparsity.

Sparsity of a set of runs = 1 - (sum of active (token, expert) pairs) / (sum over MoE layers of K x tokens),
with K the layer's static top-k. The counts come from `AdaptiveRouting.counters()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gemoe_cli.routing import AdaptiveRouting, LayerCounters


@dataclass
class _LayerTotals:
    top_k: int
    tokens: int = 0
    active_pairs: int = 0
    nonfinite_tokens: int = 0
    k_histogram: list[int] = field(default_factory=list)

    def add(self, counters: LayerCounters, sign: int = 1) -> None:
        self.tokens += sign * counters.tokens
        self.active_pairs += sign * counters.active_pairs
        self.nonfinite_tokens += sign * counters.nonfinite_tokens
        if len(self.k_histogram) < len(counters.k_histogram):
            self.k_histogram += [0] * (len(counters.k_histogram) - len(self.k_histogram))
        for k, count in enumerate(counters.k_histogram):
            self.k_histogram[k] += sign * count

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.active_pairs / (self.top_k * self.tokens) if self.tokens else None


class ActivationTally:
    """Per-layer activation counts added up over several runs of one policy."""

    def __init__(self, routing: AdaptiveRouting):
        self.layers = {path: _LayerTotals(layer.moe.top_k) for path, layer in routing.layers.items()}

    def add(self, counters: Mapping[str, LayerCounters], minus: Mapping[str, LayerCounters] | None = None) -> None:
        """Add one run's counters; with `minus`, add only what was counted after that snapshot."""
        for path, layer_counters in counters.items():
            self.layers[path].add(layer_counters)
            if minus is not None:
                self.layers[path].add(minus[path], sign=-1)

    @property
    def tokens(self) -> int:
        return sum(layer.tokens for layer in self.layers.values())

    def sparsity(self) -> float | None:
        """Return the overall sparsity, or None when nothing was counted."""
        static_pairs = sum(layer.top_k * layer.tokens for layer in self.layers.values())
        active = sum(layer.active_pairs for layer in self.layers.values())
        return 1.0 - active / static_pairs if static_pairs else None

    def to_json(self) -> dict:
        static_pairs = sum(layer.top_k * layer.tokens for layer in self.layers.values())
        return {
            "overall": self.sparsity(),
            "active_pairs": sum(layer.active_pairs for layer in self.layers.values()),
            "static_pairs": static_pairs,
            "layers": {
                path: {
                    "sparsity": layer.sparsity,
                    "tokens": layer.tokens,
                    "active_pairs": layer.active_pairs,
                    "top_k": layer.top_k,
                    "k_histogram": layer.k_histogram,
                    "nonfinite_tokens": layer.nonfinite_tokens,
                }
                for path, layer in self.layers.items()
            },
        }
