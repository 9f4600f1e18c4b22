"""The routing policies a benchmark compares, and the calibration of baselines to GeMoE's sparsity.

Every policy except `static_native` attaches through `attach_adaptive_routing` with sparse dispatch, so they
share the router hooks, the `route` step and the expert kernels, and differ only in how many experts each
token keeps:

- `static_native`: nothing attached; the model's own experts implementation (the overhead reference).
- `static`: all thresholds -inf with k_max = K, so every token keeps its K experts through the gemoe path.
- `gemoe`: the recipe's gating-entropy thresholds.
- `top_p`, `ratio_skip`: baselines whose parameter is bisected until their sparsity on the evaluation set
  matches GeMoE's.
- `static_k_minus_1`: every token keeps K - 1 experts; its sparsity is 1/K by construction, not calibrated.

Baselines replace the thresholds only in the layers the recipe routes adaptively and keep the recipe's
`k_min`, `k_max` and `renormalize`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gemoe_cli.calibration.retention import model_forward
from gemoe_cli.routing import AdaptiveRouting, attach_adaptive_routing
from gemoe_cli.routing.baselines import RatioSkip, StaticK, TopP

logger = logging.getLogger(__name__)

SPARSITY_TOLERANCE = 0.002
"""Baseline calibration stops once the measured sparsity is this close to GeMoE's."""
MAX_BISECTION_STEPS = 20

NATIVE = "static_native"
STATIC = "static"
GEMOE = "gemoe"
TOP_P = "top_p"
RATIO_SKIP = "ratio_skip"
STATIC_K_MINUS_1 = "static_k_minus_1"
POLICY_ORDER = (NATIVE, STATIC, GEMOE, TOP_P, RATIO_SKIP, STATIC_K_MINUS_1)


@dataclass(frozen=True)
class RoutingSpec:
    """The adaptive routing under test: per-layer thresholds in nats and the bounds on k."""

    thresholds: Mapping[str, Sequence[float]]
    k_min: int = 1
    k_max: int | None = None
    """`None` means each layer's static top-k K."""
    renormalize: str = "preserve_mass"
    source: str = ""
    """Origin of the thresholds for the record: a recipe file or a converted checkpoint."""
    modality_thresholds: Mapping[str, Mapping[str, Sequence[float]]] = field(default_factory=dict)
    """Per-layer thresholds by token modality (``text``, ``image``, ...) of a per-modality recipe."""

    @classmethod
    def from_recipe(cls, recipe, source: str) -> RoutingSpec:
        return cls(
            thresholds={path: list(layer.thresholds) for path, layer in recipe.layers.items()},
            k_min=recipe.routing.k_min,
            k_max=recipe.routing.k_max,
            renormalize=recipe.routing.renormalize,
            source=source,
            modality_thresholds={
                path: {name: list(values) for name, values in layer.modalities.items()}
                for path, layer in recipe.layers.items()
                if layer.modalities
            },
        )

    def attach(
        self,
        model: torch.nn.Module,
        thresholds: Mapping[str, Sequence[float]] | None = None,
        modality_thresholds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ):
        """Attach this routing to `model` (optionally with other thresholds) and return the handle."""
        return attach_adaptive_routing(
            model,
            self.thresholds if thresholds is None else thresholds,
            k_min=self.k_min,
            k_max=self.k_max,
            renormalize=self.renormalize,
            modality_thresholds=self.modality_thresholds if modality_thresholds is None else modality_thresholds,
        )

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "k_min": self.k_min,
            "k_max": self.k_max,
            "renormalize": self.renormalize,
            "adaptive_layers": len(self.thresholds),
            "per_modality": bool(self.modality_thresholds),
        }


Attach = Callable[[torch.nn.Module], AdaptiveRouting | None]


@dataclass
class Policy:
    """One routing policy: how to attach it, its parameter and, for baselines, how it was calibrated."""

    name: str
    description: str
    attach: Attach
    parameter: dict | None = None
    """``{"name": ..., "value": ...}`` of the policy's own parameter, if it has one."""
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)


def native_policy() -> Policy:
    return Policy(NATIVE, "no gemoe attached: the model's own experts implementation", lambda model: None)


def static_policy(spec: RoutingSpec) -> Policy:
    def attach(model):
        # Thresholds left out default to -inf, and k_max=None means K, so every token keeps K experts.
        return attach_adaptive_routing(model, {}, k_min=spec.k_min, k_max=None, renormalize=spec.renormalize)

    return Policy(STATIC, "static top-K through gemoe's router hooks and sparse dispatch", attach)


def gemoe_policy(spec: RoutingSpec) -> Policy:
    return Policy(GEMOE, "gating-entropy thresholds from the recipe", spec.attach)


def baseline_policy(name: str, description: str, spec: RoutingSpec, baseline, parameter: dict) -> Policy:
    def attach(model):
        routing = spec.attach(model)
        set_baseline(routing, spec, baseline)
        return routing

    return Policy(name, description, attach, parameter=parameter)


def set_baseline(routing: AdaptiveRouting, spec: RoutingSpec, baseline) -> None:
    """Give every layer that the spec routes adaptively the `baseline` policy (None restores thresholds)."""
    for path, layer in routing.layers.items():
        if path in spec.thresholds:
            layer.baseline = baseline


@torch.no_grad()
def measure_sparsity(model: torch.nn.Module, routing: AdaptiveRouting, batches: Sequence) -> float:
    """Run `batches` (token blocks or image+text samples) as the model routes now; return the counted sparsity."""
    device = next(model.parameters()).device
    routing.reset_counters()
    for batch in batches:
        model_forward(model, batch.to(device))
    return routing.sparsity()


@dataclass(frozen=True)
class Calibration:
    """Result of bisecting one baseline parameter to a target sparsity."""

    parameter: float
    sparsity: float
    target: float
    steps: int
    history: list[tuple[float, float]]

    @property
    def converged(self) -> bool:
        return abs(self.sparsity - self.target) <= SPARSITY_TOLERANCE

    def to_json(self) -> dict:
        return {
            "target_sparsity": self.target,
            "measured_sparsity": self.sparsity,
            "tolerance": SPARSITY_TOLERANCE,
            "converged": self.converged,
            "steps": self.steps,
            "history": [{"parameter": value, "sparsity": sparsity} for value, sparsity in self.history],
        }


def bisect_parameter(
    measure: Callable[[float], float], target: float, low: float, high: float, sparsity_rises: bool
) -> Calibration:
    """Bisect a parameter in [low, high] until `measure(parameter)` is within tolerance of `target`.

    `sparsity_rises` is True when sparsity grows with the parameter. The measured function is a step
    function of the parameter, so the closest point seen is returned when no point is within tolerance.
    """
    history: list[tuple[float, float]] = []
    best: tuple[float, float] | None = None
    for _ in range(MAX_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        sparsity = measure(middle)
        history.append((middle, sparsity))
        if best is None or abs(sparsity - target) < abs(best[1] - target):
            best = (middle, sparsity)
        if abs(sparsity - target) <= SPARSITY_TOLERANCE:
            break
        if (sparsity < target) == sparsity_rises:
            low = middle
        else:
            high = middle
    return Calibration(best[0], best[1], target, len(history), history)


def calibrate_baselines(
    model: torch.nn.Module,
    spec: RoutingSpec,
    batches: Sequence[torch.Tensor],
    target_sparsity: float,
    progress: Callable[[str], None] | None = None,
) -> list[Policy]:
    """Return the top_p, ratio_skip and static_k_minus_1 policies, the first two matched to `target_sparsity`."""
    policies = []
    with spec.attach(model) as routing:
        top_k = min(layer.moe.top_k for layer in routing.layers.values())

        def measure_with(make_baseline):
            def measure(value: float) -> float:
                set_baseline(routing, spec, make_baseline(value))
                return measure_sparsity(model, routing, batches)

            return measure

        if progress is not None:
            progress(f"calibrating top_p to sparsity {target_sparsity:.4f}")
        top_p = bisect_parameter(measure_with(TopP), target_sparsity, 0.0, 1.0, sparsity_rises=False)
        if progress is not None:
            progress(f"calibrating ratio_skip to sparsity {target_sparsity:.4f}")
        ratio = bisect_parameter(measure_with(RatioSkip), target_sparsity, 0.0, 1.0, sparsity_rises=True)

    for name, description, baseline, label, calibration in (
        (TOP_P, "smallest prefix of the top-K whose gating probability reaches p", TopP, "p", top_p),
        (RATIO_SKIP, "drop experts below beta times the top expert's probability", RatioSkip, "beta", ratio),
    ):
        if not calibration.converged:
            logger.warning(
                "%s calibration reached sparsity %.4f, not within %.3f of the target %.4f",
                name,
                calibration.sparsity,
                SPARSITY_TOLERANCE,
                target_sparsity,
            )
        policy = baseline_policy(
            name, description, spec, baseline(calibration.parameter), {"name": label, "value": calibration.parameter}
        )
        policy.calibration = calibration.to_json()
        policies.append(policy)

    if top_k - 1 >= spec.k_min:
        policies.append(
            baseline_policy(
                STATIC_K_MINUS_1,
                f"every token keeps {top_k - 1} experts (not calibrated)",
                spec,
                StaticK(top_k - 1),
                {"name": "k", "value": top_k - 1},
            )
        )
    else:
        logger.warning("static_k_minus_1 skipped: K - 1 = %d is below k_min = %d", top_k - 1, spec.k_min)
    return policies


def shifted_thresholds(thresholds: Mapping[str, Sequence[float]], shift: float) -> dict[str, list[float]]:
    """Add `shift` nats to every threshold (infinite thresholds stay infinite)."""
    return {path: [value + shift for value in values] for path, values in thresholds.items()}


def shifted_modality_thresholds(
    thresholds: Mapping[str, Mapping[str, Sequence[float]]], shift: float
) -> dict[str, dict[str, list[float]]]:
    """Add `shift` nats to every per-modality threshold (infinite thresholds stay infinite)."""
    return {path: shifted_thresholds(by_modality, shift) for path, by_modality in thresholds.items()}


def sweep_parameters(points: int, num_experts: int, top_k: int, k_min: int) -> dict[str, list[float]]:
    """Return the parameter values of the retention-versus-sparsity sweep, per policy.

    GeMoE's value is a global shift in nats added to every threshold, from -ln(E)/2 to +ln(E)/2, so the
    unshifted recipe is the middle point when `points` is odd. The baselines sweep p and beta over (0, 1]
    and [0, 1), and static_k takes every k from k_min to K.
    """
    half_range = 0.5 * math.log(num_experts)
    shifts = torch.linspace(-half_range, half_range, points).tolist()
    return {
        GEMOE: shifts,
        TOP_P: torch.linspace(1.0 / points, 1.0, points).tolist(),
        RATIO_SKIP: torch.linspace(0.0, 1.0 - 1.0 / points, points).tolist(),
        "static_k": [float(k) for k in range(k_min, top_k + 1)],
    }
