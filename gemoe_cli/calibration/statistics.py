"""Per-layer calibration statistics: a gating-entropy histogram with the routing mass each `k` would drop.

Memory is fixed by the number of bins, not by the calibration set: each layer keeps `B` token counts and
`B x (K + 1)` dropped-mass sums. Everything is an integer (dropped mass in fixed point), so statistics of
two runs over disjoint data merge exactly into the statistics of their union, in any order.

Error bounds:
- entropy quantiles and threshold positions are exact up to one bin width, ``log(E) / B`` nats;
- each token's dropped mass is rounded to a multiple of ``2**-20`` (error at most ``2**-21`` per token).

For vision-language models the collector also keeps one `CalibrationStatistics` per token modality
(``text``, ``image``, ...), so entropy and thresholds can be reported and fitted per modality.
`keyed_by_modality` turns those into one statistics object whose entries are (layer, modality) pairs, the
units a per-modality fit allocates sparsity between.

Legend for shape comments: T tokens, K slots of the static selection, B bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 4096
MASS_SCALE = 2**20


@dataclass
class LayerStatistics:
    """Histogram statistics of one MoE layer."""

    path: str
    num_experts: int
    top_k: int
    num_bins: int = DEFAULT_BINS
    counts: np.ndarray = field(default=None)  # (B,) tokens per entropy bin
    dropped_mass: np.ndarray = field(default=None)  # (B, K + 1) fixed-point mass dropped when keeping k slots
    nonfinite_tokens: int = 0

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.num_bins, dtype=np.int64)
        if self.dropped_mass is None:
            self.dropped_mass = np.zeros((self.num_bins, self.top_k + 1), dtype=np.int64)

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_experts)

    @property
    def bin_width(self) -> float:
        return self.max_entropy / self.num_bins

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def bin_edges(self) -> np.ndarray:
        """Return the B + 1 bin edges in nats."""
        return np.linspace(0.0, self.max_entropy, self.num_bins + 1)

    def bin_of(self, entropy: np.ndarray) -> np.ndarray:
        """Return the bin index of each entropy value; values outside [0, log E] go to the end bins."""
        scaled = np.floor(np.nan_to_num(entropy, nan=0.0) / self.bin_width)
        return np.clip(scaled, 0, self.num_bins - 1).astype(np.int64)

    def add(self, entropy: np.ndarray, dropped: np.ndarray, nonfinite: int = 0) -> None:
        """Add tokens: their entropy (T,) and the fraction of routing mass dropped at each k (T, K + 1)."""
        bins = self.bin_of(entropy)
        self.counts += np.bincount(bins, minlength=self.num_bins)
        fixed = np.rint(np.clip(dropped, 0.0, 1.0) * MASS_SCALE).astype(np.int64)
        np.add.at(self.dropped_mass, bins, fixed)
        self.nonfinite_tokens += int(nonfinite)

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        """Return the statistics of both runs together (exact)."""
        if (self.path, self.num_experts, self.top_k, self.num_bins) != (
            other.path,
            other.num_experts,
            other.top_k,
            other.num_bins,
        ):
            raise ValueError(f"cannot merge statistics of {self.path} with statistics of {other.path}")
        return LayerStatistics(
            self.path,
            self.num_experts,
            self.top_k,
            self.num_bins,
            self.counts + other.counts,
            self.dropped_mass + other.dropped_mass,
            self.nonfinite_tokens + other.nonfinite_tokens,
        )

    def mean_dropped_mass(self) -> np.ndarray:
        """Return the mean dropped fraction of routing mass per bin and k (B, K + 1); 0 for empty bins."""
        counts = np.maximum(self.counts, 1)[:, None]
        return self.dropped_mass / MASS_SCALE / counts

    def quantile(self, level: float) -> float:
        """Return the entropy below which a fraction `level` of tokens lies (within one bin width)."""
        if self.tokens == 0:
            return float("nan")
        cumulative = np.cumsum(self.counts) / self.tokens
        index = int(np.searchsorted(cumulative, level, side="left"))
        if index >= self.num_bins:
            return self.max_entropy
        below = cumulative[index - 1] if index > 0 else 0.0
        inside = self.counts[index] / self.tokens
        fraction = 0.0 if inside == 0 else (level - below) / inside
        return float((index + min(max(fraction, 0.0), 1.0)) * self.bin_width)

    def to_json(self) -> dict:
        nonzero = np.nonzero(self.counts)[0]
        return {
            "path": self.path,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_bins": self.num_bins,
            "nonfinite_tokens": self.nonfinite_tokens,
            "bins": nonzero.tolist(),
            "counts": self.counts[nonzero].tolist(),
            "dropped_mass": self.dropped_mass[nonzero].tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> LayerStatistics:
        layer = cls(data["path"], data["num_experts"], data["top_k"], data["num_bins"])
        bins = np.asarray(data["bins"], dtype=np.int64)
        layer.counts[bins] = np.asarray(data["counts"], dtype=np.int64)
        layer.dropped_mass[bins] = np.asarray(data["dropped_mass"], dtype=np.int64).reshape(len(bins), -1)
        layer.nonfinite_tokens = int(data["nonfinite_tokens"])
        return layer


@dataclass
class CalibrationStatistics:
    """Statistics of every MoE layer of a model, keyed by MoE block path.

    `modalities` holds the same statistics split by token modality (empty for text-only models); each of its
    entries lists only the layers that saw tokens of that modality.
    """

    layers: dict[str, LayerStatistics] = field(default_factory=dict)
    modalities: dict[str, CalibrationStatistics] = field(default_factory=dict)

    def merge(self, other: CalibrationStatistics) -> CalibrationStatistics:
        if set(self.layers) != set(other.layers):
            raise ValueError("cannot merge statistics collected on different MoE layers")
        modalities = dict(self.modalities)
        for name, statistics in other.modalities.items():
            modalities[name] = modalities[name].merge_layers(statistics) if name in modalities else statistics
        return CalibrationStatistics(
            {path: self.layers[path].merge(other.layers[path]) for path in self.layers}, modalities
        )

    def merge_layers(self, other: CalibrationStatistics) -> CalibrationStatistics:
        """Merge statistics whose layer sets may differ; a layer present in one side is kept as it is."""
        layers = dict(self.layers)
        for path, layer in other.layers.items():
            layers[path] = layers[path].merge(layer) if path in layers else layer
        return CalibrationStatistics(layers)

    def to_json(self) -> dict:
        data = {"layers": [layer.to_json() for layer in self.layers.values()]}
        if self.modalities:
            data["modalities"] = {name: statistics.to_json() for name, statistics in self.modalities.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> CalibrationStatistics:
        layers = [LayerStatistics.from_json(item) for item in data["layers"]]
        modalities = {name: cls.from_json(item) for name, item in data.get("modalities", {}).items()}
        return cls({layer.path: layer for layer in layers}, modalities)


MODALITY_SEPARATOR = "@"


def modality_key(path: str, modality: str) -> str:
    """Return the key of one (layer, modality) pair in `keyed_by_modality` statistics: ``path@modality``."""
    return f"{path}{MODALITY_SEPARATOR}{modality}"


def split_modality_key(key: str) -> tuple[str, str | None]:
    """Return (layer path, modality) of a key; the modality is `None` for a plain layer path."""
    path, separator, modality = key.rpartition(MODALITY_SEPARATOR)
    return (path, modality) if separator else (key, None)


def keyed_by_modality(statistics: CalibrationStatistics) -> CalibrationStatistics:
    """Return statistics with one entry per (layer, modality) pair that saw tokens, keyed by `modality_key`."""
    layers = {}
    for name, by_layer in statistics.modalities.items():
        for path, layer in by_layer.layers.items():
            if layer.tokens or layer.nonfinite_tokens:
                key = modality_key(path, name)
                layers[key] = LayerStatistics(
                    key,
                    layer.num_experts,
                    layer.top_k,
                    layer.num_bins,
                    layer.counts,
                    layer.dropped_mass,
                    layer.nonfinite_tokens,
                )
    return CalibrationStatistics(layers)


def dropped_mass_per_k(slot_ranks, top_k_weights):
    """Return the fraction of routing mass dropped when keeping the k best slots, for k = 0..K (T, K + 1).

    Uses torch tensors: `slot_ranks` (T, K) from the router's selection scores, `top_k_weights` (T, K).
    """
    import torch

    weights = torch.nan_to_num(top_k_weights.float(), nan=0.0).abs()
    ranked = torch.zeros_like(weights).scatter_(-1, slot_ranks, weights)  # (T, K) weight at each rank
    kept = torch.cumsum(ranked, dim=-1)  # (T, K) mass of the k + 1 best slots
    total = kept[:, -1:].clamp_min(torch.finfo(kept.dtype).tiny)
    kept = torch.cat([torch.zeros_like(total), kept], dim=-1)  # (T, K + 1)
    return (1.0 - kept / total).clamp(0.0, 1.0)


class StatisticsCollector:
    """An observer for `AdaptiveLayer.observers` that fills `CalibrationStatistics` from routing events."""

    def __init__(self, routing, num_bins: int = DEFAULT_BINS):
        self.statistics = CalibrationStatistics(
            {
                path: LayerStatistics(path, layer.moe.num_experts, layer.moe.top_k, num_bins)
                for path, layer in routing.layers.items()
            }
        )
        self._routing = routing

    def __enter__(self) -> StatisticsCollector:
        for layer in self._routing.layers.values():
            layer.observers.append(self.observe)
        return self

    def __exit__(self, *exc_info) -> None:
        for layer in self._routing.layers.values():
            layer.observers.remove(self.observe)

    def observe(self, event) -> None:
        import torch

        from gemoe_cli.routing.modality import MODALITIES

        entropy = event.entropy.float()
        finite = torch.isfinite(entropy)
        dropped = dropped_mass_per_k(event.slot_ranks, event.top_k_weights)
        layer = self.statistics.layers[event.path]
        layer.add(
            entropy[finite].cpu().numpy(),
            dropped[finite].double().cpu().numpy(),
            nonfinite=int((~finite).sum()),
        )
        if event.modality is None:
            return
        for code in torch.unique(event.modality).tolist():
            selected = event.modality == code
            self._modality_layer(MODALITIES[code], layer).add(
                entropy[selected & finite].cpu().numpy(),
                dropped[selected & finite].double().cpu().numpy(),
                nonfinite=int((selected & ~finite).sum()),
            )

    def _modality_layer(self, modality: str, layer: LayerStatistics) -> LayerStatistics:
        by_layer = self.statistics.modalities.setdefault(modality, CalibrationStatistics())
        if layer.path not in by_layer.layers:
            by_layer.layers[layer.path] = LayerStatistics(layer.path, layer.num_experts, layer.top_k, layer.num_bins)
        return by_layer.layers[layer.path]
