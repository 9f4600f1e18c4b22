"""The export-time routing and experts path: what the exporter traces instead of the eager MoE code.

The experts implementations of transformers 5.23 do not export to ONNX with torch 2.13. The eager
expert loop guards on data-dependent values, the ``grouped_mm`` fallback has no ONNX translation, and
``batched_mm`` raises on the sentinel expert index. Inside `export_routing`, every MoE block instead:

1. keeps its router's raw output through a forward hook, as the adaptive routing hooks do;
2. rewrites the static top-K selection with one ``gemoe::entropy_adaptive_router`` op (an
   ``ai.gemoe::EntropyAdaptiveRouter`` node in ONNX) that returns ``k_max`` slots per token;
3. computes the experts on the kept slots. The `portable` body gathers each expert's tokens with
   NonZero and adds its weighted output back with ScatterND, so a dropped slot costs no expert compute.
   The `ort` body calls onnxruntime's ``com.microsoft::MoE`` on log-weights (see `ort_experts_forward`).

Leaving the context removes every hook, instance attribute and buffer it added. It applies to experts
classes decorated with transformers' ``use_experts_implementation`` and to the families whose adapter
gives an ``expert_forward`` (dbrx).

Legend for shape comments: T tokens, E experts, K slots of the static selection, M = k_max slots,
D hidden size, I expert width.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from gemoe_cli.errors import InvalidInputError, UnsupportedModelError
from gemoe_cli.export.torch_ops import ORT_MOE_BACKGROUND
from gemoe_cli.recipe import encode_threshold
from gemoe_cli.routing.discovery import MoEBlock, find_moe_blocks, static_selection_bias
from gemoe_cli.routing.dispatch import decorated_expert_forward
from gemoe_cli.routing.families import BIAS_NAMES
from gemoe_cli.routing.policy import validate_thresholds

logger = logging.getLogger(__name__)

Body = Literal["portable", "ort"]
BODIES: tuple[str, ...] = ("portable", "ort")

THRESHOLDS_BUFFER = "gemoe_thresholds"


@dataclass(frozen=True)
class RoutingSpec:
    """Adaptive routing settings to export: bounds, weight rescaling and per-layer thresholds.

    A MoE layer missing from `thresholds` gets all ``-inf`` thresholds, so it routes statically.
    `k_max=None` means each layer's static top-k.
    """

    k_min: int = 1
    k_max: int | None = None
    renormalize: str = "preserve_mass"
    thresholds: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def layer_bounds(self, block: MoEBlock) -> tuple[int, int]:
        """Return (k_min, k_max) of one MoE block."""
        return self.k_min, block.top_k if self.k_max is None else self.k_max

    def layer_thresholds(self, block: MoEBlock) -> list[float]:
        """Return the validated thresholds of one MoE block."""
        k_min, k_max = self.layer_bounds(block)
        if k_max > block.top_k:
            raise InvalidInputError(
                f"k_max={k_max} is greater than the static top-k K={block.top_k} of {block.path}; "
                f"set k_max to {block.top_k} or less."
            )
        values = [float(value) for value in self.thresholds.get(block.path, [-math.inf] * (k_max - k_min))]
        validate_thresholds(values, k_min, k_max, where=f"layers[{block.path}].thresholds")
        return values

    def as_json(self) -> dict:
        """Return the settings as JSON-safe data (infinite thresholds as the strings "inf" and "-inf")."""
        return {
            "k_min": self.k_min,
            "k_max": self.k_max,
            "renormalize": self.renormalize,
            "thresholds": {
                path: [encode_threshold(float(value)) for value in values] for path, values in self.thresholds.items()
            },
        }


def check_exportable(blocks: Sequence[MoEBlock], body: Body) -> None:
    """Raise `UnsupportedModelError` when a MoE block has no export-time path for `body`."""
    for block in blocks:
        adapter = block.adapter
        if not isinstance(block.scoring, str):
            raise UnsupportedModelError(
                f"family {adapter.name} scores its router with a custom function ({block.scoring_name}); "
                "ONNX export supports softmax, sigmoid and probabilities scoring."
            )
        if adapter.block_forward is not None or adapter.extra.get("input_scaled"):
            raise UnsupportedModelError(
                f"family {adapter.name} scales expert inputs by router scores; ONNX export does not support it."
            )
        experts = block.experts
        if adapter.expert_forward is None and not hasattr(experts, "has_gate"):
            raise UnsupportedModelError(
                f"the experts of {block.path} ({type(experts).__name__}) are not decorated with transformers' "
                "use_experts_implementation; ONNX export does not support them."
            )
        if body == "ort":
            _check_ort_experts(block)


def _check_ort_experts(block: MoEBlock) -> None:
    from transformers.integrations.moe import _default_apply_gate

    experts = block.experts
    problem = None
    if not getattr(experts, "has_gate", False):
        problem = "they are not gated (SwiGLU)"
    elif getattr(experts, "has_post_expert_norm", False):
        problem = "they apply a norm after each expert"
    elif getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        problem = f"{type(experts).__name__} has its own gate function"
    elif type(experts.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        problem = f"their activation is {type(experts.act_fn).__name__}, not SiLU"
    if problem is not None:
        raise UnsupportedModelError(
            f"--body ort needs SwiGLU experts with SiLU, but at {block.path} {problem}; use --body portable."
        )


class ActivationRecorder:
    """Experts engaged per token at each MoE layer during one forward pass, in MoE block order."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._values: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self._values.clear()

    def record(self, path: str, experts_per_token: torch.Tensor) -> None:
        self._values[path] = experts_per_token

    def active_pairs(self) -> torch.Tensor:
        """Return the active (token, expert) pairs of each MoE layer, (L,) int64; 0 for a layer that did not run."""
        zero = torch.zeros((), dtype=torch.int64)
        return torch.stack([self._values[path].sum() if path in self._values else zero for path in self.paths])


class _LayerExport:
    """The export-time routing of one MoE block."""

    def __init__(self, block: MoEBlock, routing: RoutingSpec, body: Body, recorder: ActivationRecorder):
        self.block = block
        self.k_min, self.k_max = routing.layer_bounds(block)
        self.thresholds = routing.layer_thresholds(block)
        self.renormalize = routing.renormalize
        self.body = body
        self.recorder = recorder
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def on_router_output(self, router, args, kwargs, output) -> None:
        position = self.block.adapter.logits_position
        scores = output if position is None else output[position]
        self._pending = (scores, self._selection_bias(args, kwargs))

    def _selection_bias(self, args, kwargs) -> torch.Tensor | None:
        if self.block.adapter.bias_from_argument:
            for name in BIAS_NAMES:
                if isinstance(kwargs.get(name), torch.Tensor):
                    return kwargs[name]
            return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        return static_selection_bias(self.block.block, self.block.router)

    def route(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (T, M) adaptive weights and index for the pending router output."""
        if self._pending is None:
            raise RuntimeError(f"the router of {self.block.path} did not run before its experts")
        scores, bias = self._pending
        self._pending = None
        thresholds = getattr(self.block.block, THRESHOLDS_BUFFER)
        weights, index, k = torch.ops.gemoe.entropy_adaptive_router(
            scores.reshape(-1, scores.size(-1)),
            thresholds,
            top_k_index.reshape(-1, top_k_index.size(-1)),
            top_k_weights.reshape(-1, top_k_weights.size(-1)),
            bias,
            self.k_min,
            self.k_max,
            self.block.scoring,
            self.renormalize,
            bool(self.block.adapter.bias_on_logits),
        )
        self.recorder.record(self.block.path, k)
        return weights, index

    def experts_forward(self, experts, hidden_states, top_k_index, top_k_weights):
        weights, index = self.route(top_k_index, top_k_weights)
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])  # (T, D)
        if self.body == "ort":
            output = ort_experts_forward(experts, flat, index, weights, self.block.num_experts)
        else:
            expert_forward = self.block.adapter.expert_forward or decorated_expert_forward
            output = portable_experts_forward(experts, flat, index, weights, self.block.num_experts, expert_forward)
        return output.view(shape)


def portable_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    expert_forward: Callable = decorated_expert_forward,
) -> torch.Tensor:
    """Compute ``sum_m w[t, m] * expert_{index[t, m]}(x[t])`` with one gather per expert (T, D) -> (T, D).

    The loop over experts unrolls at export. Each expert runs only on the tokens whose kept slots name
    it, found with NonZero in ONNX, so its row count depends on the data and may be 0. The sentinel
    index E matches no expert.
    """
    output = torch.zeros_like(hidden_states)
    for expert in range(num_experts):
        selected = index == expert  # (T, M)
        token_weights = (weights * selected).sum(dim=-1)  # (T,)
        tokens = selected.any(dim=-1).nonzero().squeeze(-1)  # (n,)
        expert_output = expert_forward(experts, expert, hidden_states.index_select(0, tokens))  # (n, D)
        scale = token_weights.index_select(0, tokens).unsqueeze(-1).to(expert_output.dtype)
        output = output.index_add(0, tokens, (expert_output * scale).to(output.dtype))
    return output


def ort_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Run the kept slots through onnxruntime's ``com.microsoft::MoE`` (T, D) -> (T, D).

    That op (onnxruntime 1.32, CPU) applies softmax to its router input and weights its top-``k`` experts
    by the result. Its router input here is ``log w`` at the kept experts and `ORT_MOE_BACKGROUND`
    elsewhere, so softmax gives ``w / sum(w)`` on the kept experts and exactly 0 on the others. The
    output is then multiplied by ``sum(w)``. With ``k = M``, the surplus slots of tokens that keep fewer
    than M experts get weight 0. Whether they cost compute is up to the kernel: onnxruntime 1.32's CPU
    kernel ran faster with fewer nonzero weights in a micro-benchmark (see docs/benchmarks.md).
    """
    tokens = hidden_states.size(0)
    background = torch.full((tokens, num_experts + 1), ORT_MOE_BACKGROUND, dtype=torch.float32)
    # The sentinel index E lands in the extra last column, which is cut off.
    log_weights = torch.log(weights.float())  # (T, M); -inf in dropped slots
    router_input = background.scatter(-1, index, log_weights)[:, :num_experts]  # (T, E)
    router_input = torch.where(torch.isneginf(router_input), ORT_MOE_BACKGROUND, router_input)
    mass = weights.float().sum(dim=-1, keepdim=True)  # (T, 1)
    output = torch.ops.gemoe.ort_moe(
        hidden_states,
        router_input.to(hidden_states.dtype),
        experts.gemoe_fc1_weights,
        getattr(experts, "gemoe_fc1_bias", None),
        experts.gemoe_fc2_weights,
        getattr(experts, "gemoe_fc2_bias", None),
        index.size(-1),
    )
    return output * mass.to(output.dtype)


def ort_expert_weights(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the expert weights in the layout of ``com.microsoft::MoE``: (E, 2I, D) interleaved, (E, D, I)."""
    gate_up = experts.gate_up_proj.detach()
    down = experts.down_proj.detach()
    if experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    num_experts, width, hidden = gate_up.shape
    if getattr(experts, "is_concatenated", True):
        gate, up = gate_up.chunk(2, dim=1)  # (E, I, D) each
        gate_up = torch.stack([gate, up], dim=2).reshape(num_experts, width, hidden)
    weights = {"gemoe_fc1_weights": gate_up.contiguous(), "gemoe_fc2_weights": down.contiguous()}
    if experts.has_bias:
        up_bias = experts.gate_up_proj_bias.detach()
        if getattr(experts, "is_concatenated", True):
            gate_bias, value_bias = up_bias.chunk(2, dim=1)
            up_bias = torch.stack([gate_bias, value_bias], dim=2).reshape(num_experts, width)
        weights["gemoe_fc1_bias"] = up_bias.contiguous()
        weights["gemoe_fc2_bias"] = experts.down_proj_bias.detach().contiguous()
    return weights


class ExportRouting:
    """Handle of `export_routing`: the MoE blocks and the recorder of engaged experts."""

    def __init__(self, blocks: list[MoEBlock], recorder: ActivationRecorder):
        self.blocks = blocks
        self.recorder = recorder


@contextlib.contextmanager
def export_routing(model: torch.nn.Module, routing: RoutingSpec, body: Body = "portable") -> Iterator[ExportRouting]:
    """Swap in the export-time routing and experts path of every MoE block; restore the model on exit.

    Raises:
        UnsupportedModelError: a MoE block has no export-time path for `body`.
        InvalidInputError: the thresholds do not fit a layer's bounds.
    """
    if body not in BODIES:
        raise ValueError(f"body {body!r} is unknown; expected one of {', '.join(BODIES)}")
    blocks = find_moe_blocks(model)
    check_exportable(blocks, body)
    unknown = sorted(set(routing.thresholds) - {block.path for block in blocks})
    if unknown:
        raise InvalidInputError(
            f"thresholds name {unknown[0]!r}, which is not a MoE block of this model ({len(blocks)} MoE blocks "
            "found); use thresholds made for this model."
        )
    recorder = ActivationRecorder([block.path for block in blocks])
    layers = [_LayerExport(block, routing, body, recorder) for block in blocks]

    undo: list[Callable[[], None]] = []
    try:
        for layer in layers:
            _install(layer, undo)
        logger.info("export-time routing (%s body) installed on %d MoE blocks", body, len(layers))
        yield ExportRouting(blocks, recorder)
    finally:
        while undo:
            undo.pop()()


def _install(layer: _LayerExport, undo: list[Callable[[], None]]) -> None:
    block = layer.block
    thresholds = torch.tensor(layer.thresholds, dtype=torch.float32)
    _add_buffer(block.block, THRESHOLDS_BUFFER, thresholds, undo)
    if layer.body == "ort":
        for name, tensor in ort_expert_weights(block.experts).items():
            _add_buffer(block.experts, name, tensor, undo)

    handle = block.router.register_forward_hook(layer.on_router_output, with_kwargs=True)
    undo.append(handle.remove)

    experts = block.experts
    experts.__dict__["forward"] = functools.partial(layer.experts_forward, experts)
    undo.append(lambda: experts.__dict__.pop("forward", None))


def _add_buffer(module: torch.nn.Module, name: str, tensor: torch.Tensor, undo: list[Callable[[], None]]) -> None:
    if hasattr(module, name):
        raise RuntimeError(f"{type(module).__name__} already has an attribute {name!r}; cannot patch it for export")
    module.register_buffer(name, tensor, persistent=False)
    undo.append(lambda: module._buffers.pop(name, None))
