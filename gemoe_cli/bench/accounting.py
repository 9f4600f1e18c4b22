"""Expert-activation accounting: add up the adaptive layers' counters over runs and report sparsity.

Sparsity of a set of runs = 1 - (sum of active (token, expert) pairs) / (sum over MoE layers of K x tokens),
with K the layer's static top-k. The counts come from `AdaptiveRouting.counters()`. For vision-language
models the same sums are also kept over the tokens of each modality (text, image, ...), from the layers'
per-modality k histograms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gemoe_cli.routing import AdaptiveRouting, LayerCounters
from gemoe_cli.routing.modality import MODALITIES


def _add_histogram(total: list[int], histogram: list[int], sign: int) -> None:
    if len(total) < len(histogram):
        total += [0] * (len(histogram) - len(total))
    for k, count in enumerate(histogram):
        total[k] += sign * count


def _active_pairs(histogram: list[int]) -> int:
    return sum(k * count for k, count in enumerate(histogram))


@dataclass
class _LayerTotals:
    top_k: int
    tokens: int = 0
    active_pairs: int = 0
    nonfinite_tokens: int = 0
    k_histogram: list[int] = field(default_factory=list)
    modality_k_histograms: dict[str, list[int]] = field(default_factory=dict)

    def add(self, counters: LayerCounters, sign: int = 1) -> None:
        self.tokens += sign * counters.tokens
        self.active_pairs += sign * counters.active_pairs
        self.nonfinite_tokens += sign * counters.nonfinite_tokens
        _add_histogram(self.k_histogram, counters.k_histogram, sign)
        for name, histogram in counters.modality_k_histograms.items():
            _add_histogram(self.modality_k_histograms.setdefault(name, []), histogram, sign)

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.active_pairs / (self.top_k * self.tokens) if self.tokens else None

    def modality_json(self) -> dict:
        """Return tokens, active pairs, sparsity and k histogram of each modality seen, in `MODALITIES` order."""
        record = {}
        for name in MODALITIES:
            histogram = self.modality_k_histograms.get(name)
            tokens = sum(histogram or [])
            if not tokens:
                continue
            active = _active_pairs(histogram)
            record[name] = {
                "sparsity": 1.0 - active / (self.top_k * tokens),
                "tokens": tokens,
                "active_pairs": active,
                "k_histogram": list(histogram),
            }
        return record


class ActivationTally:
    """Per-layer activation counts added up over several runs of one policy."""

    def __init__(self, routing: AdaptiveRouting):
        self.layers = {path: _LayerTotals(layer.moe.top_k) for path, layer in routing.layers.items()}
        self.tracks_modality = routing.tracks_modality
        """Whether the routed tokens' modalities are known (vision-language models)."""

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

    def modality_sparsity(self) -> dict | None:
        """Return sparsity and pair counts over the tokens of each modality, or None for a text-only model."""
        if not self.tracks_modality:
            return None
        active: dict[str, int] = {}
        static: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for layer in self.layers.values():
            for name, entry in layer.modality_json().items():
                active[name] = active.get(name, 0) + entry["active_pairs"]
                static[name] = static.get(name, 0) + layer.top_k * entry["tokens"]
                tokens[name] = tokens.get(name, 0) + entry["tokens"]
        return {
            name: {
                "sparsity": 1.0 - active[name] / static[name],
                "tokens": tokens[name],
                "active_pairs": active[name],
                "static_pairs": static[name],
            }
            for name in MODALITIES
            if static.get(name)
        }

    def to_json(self) -> dict:
        static_pairs = sum(layer.top_k * layer.tokens for layer in self.layers.values())
        return {
            "overall": self.sparsity(),
            "active_pairs": sum(layer.active_pairs for layer in self.layers.values()),
            "static_pairs": static_pairs,
            "modalities": self.modality_sparsity(),
            "layers": {
                path: {
                    "sparsity": layer.sparsity,
                    "tokens": layer.tokens,
                    "active_pairs": layer.active_pairs,
                    "top_k": layer.top_k,
                    "k_histogram": layer.k_histogram,
                    "nonfinite_tokens": layer.nonfinite_tokens,
                    "modalities": layer.modality_json() if self.tracks_modality else None,
                }
                for path, layer in self.layers.items()
            },
        }
