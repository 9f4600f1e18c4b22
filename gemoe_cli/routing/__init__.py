"""Gating-entropy adaptive routing: gating statistics, the threshold policy, family adapters and dispatch."""

from gemoe_cli.routing.adaptive import (
    AdaptiveLayer,
    AdaptiveRouting,
    LayerCounters,
    RoutingEvent,
    attach_adaptive_routing,
)
from gemoe_cli.routing.discovery import MoEBlock, find_moe_blocks
from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores
from gemoe_cli.routing.policy import experts_per_token, validate_thresholds
from gemoe_cli.routing.selection import truncate_selection

__all__ = [
    "AdaptiveLayer",
    "AdaptiveRouting",
    "LayerCounters",
    "MoEBlock",
    "RoutingEvent",
    "attach_adaptive_routing",
    "experts_per_token",
    "find_moe_blocks",
    "gating_distribution",
    "gating_entropy",
    "selection_scores",
    "truncate_selection",
    "validate_thresholds",
]
