"""ONNX side of the GeMoE custom ops: schemas, function bodies and their attachment to an exported model.

Domain ``ai.gemoe``, version 1, contains one operator, ``EntropyAdaptiveRouter``. It takes a router's raw
output and its static top-K selection, and returns the kept slots of the adaptive selection with a fixed
``k_max`` slots per token. Its semantics are those of `gemoe_cli.routing` (see docs/onnx-ops.md).

Each exported node carries a model-local FunctionProto body built from standard ONNX ops only, so a
runtime without an ``ai.gemoe`` kernel (stock onnxruntime) runs the body, and a runtime with a kernel can
replace it. String attributes (scoring, renormalize) change the structure of the computation, and ONNX
functions cannot branch on them. Each attribute combination therefore gets its own body, identified by
the FunctionProto ``overload`` field (IR version 10 and later).

Legend for shape comments: T tokens, E experts, K slots of the static selection, M = k_max slots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, defs, helper

DOMAIN = "ai.gemoe"
DOMAIN_VERSION = 1
ROUTER_OP = "EntropyAdaptiveRouter"
ONNX_OPSET = 18
"""The default-domain opset of exported models; function bodies must import the same version."""
MIN_IR_VERSION = 10
"""FunctionProto overloads need IR version 10."""

MICROSOFT_DOMAIN = "com.microsoft"
ORT_MOE_OP = "MoE"

SCORINGS = ("softmax", "sigmoid", "probabilities")
RENORMALIZATIONS = ("preserve_mass", "none")

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class RouterVariant:
    """The attribute combination that fixes the structure of one ``EntropyAdaptiveRouter`` body."""

    scoring: str
    renormalize: str
    has_bias: bool
    bias_on_logits: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring {self.scoring!r} is not exportable; expected one of {', '.join(SCORINGS)}")
        if self.renormalize not in RENORMALIZATIONS:
            raise ValueError(f"renormalize {self.renormalize!r} is unknown; expected {' or '.join(RENORMALIZATIONS)}")

    @property
    def overload(self) -> str:
        """The FunctionProto overload name, for example ``sigmoid-preserve_mass-bias``."""
        parts = [self.scoring, self.renormalize]
        if self.has_bias:
            parts.append("bias_on_logits" if self.bias_on_logits else "bias")
        return "-".join(parts)


# --- schemas ---------------------------------------------------------------------------------------


def _router_schema() -> defs.OpSchema:
    parameter = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attribute = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    return defs.OpSchema(
        ROUTER_OP,
        DOMAIN,
        DOMAIN_VERSION,
        doc="Gating-entropy adaptive routing: keep the first k of a static top-K selection per token.",
        inputs=[
            parameter("router_logits", "T", "(T, E) raw router output"),
            parameter("thresholds", "tensor(float)", "(k_max - k_min,) non-decreasing entropy thresholds in nats"),
            parameter("top_k_index", "tensor(int64)", "(T, K) experts of the static selection"),
            parameter("top_k_weights", "W", "(T, K) routing weights of the static selection"),
            parameter(
                "selection_bias", "T", "(E,) score-correction bias, used only for ranking", param_option=optional
            ),
        ],
        outputs=[
            parameter("routing_weights", "W", "(T, k_max) kept weights in rank order, 0 in dropped slots"),
            parameter("expert_index", "tensor(int64)", "(T, k_max) kept experts in rank order, E in dropped slots"),
            parameter("experts_per_token", "tensor(int64)", "(T,) number of kept experts k"),
        ],
        type_constraints=[("T", _FLOAT_TYPES, "router output type"), ("W", _FLOAT_TYPES, "routing weight type")],
        attributes=[
            attribute("k_min", kind.INT, "minimum experts per token"),
            attribute("k_max", kind.INT, "maximum experts per token, the number of output slots"),
            attribute("scoring", kind.STRING, "softmax, sigmoid or probabilities"),
            attribute("renormalize", kind.STRING, "preserve_mass or none"),
            attribute(
                "bias_on_logits",
                helper.make_attribute("bias_on_logits", 0),
                "1: add selection_bias to raw logits instead of scores",
            ),
        ],
    )


def _ort_moe_schema() -> defs.OpSchema:
    # The subset of onnxruntime's com.microsoft::MoE (onnxruntime 1.32) that the `ort` body emits.
    parameter = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attribute = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    inputs = [
        parameter("input", "T"),
        parameter("router_probs", "T"),
        parameter("fc1_experts_weights", "T"),
        parameter("fc1_experts_bias", "T", param_option=optional),
        parameter("fc2_experts_weights", "T"),
        parameter("fc2_experts_bias", "T", param_option=optional),
        parameter("fc3_experts_weights", "T", param_option=optional),
        parameter("fc3_experts_bias", "T", param_option=optional),
    ]
    attributes = [
        attribute("k", kind.INT, "experts per token"),
        attribute("activation_type", kind.STRING, "activation"),
        attribute("swiglu_fusion", kind.INT, "gate/up layout", required=False),
        attribute("normalize_routing_weights", kind.INT, "renormalize the top-k weights", required=False),
        attribute("activation_alpha", kind.FLOAT, "SwiGLU alpha", required=False),
        attribute("activation_beta", kind.FLOAT, "SwiGLU beta", required=False),
    ]
    return defs.OpSchema(
        ORT_MOE_OP,
        MICROSOFT_DOMAIN,
        1,
        inputs=inputs,
        outputs=[parameter("output", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "")],
        attributes=attributes,
    )


@contextlib.contextmanager
def registered_schemas(include_ort_moe: bool = False) -> Iterator[None]:
    """Register the op schemas the exporter needs to emit custom-domain nodes, and remove them on exit.

    onnxscript emits a node only for an op with a registered schema. The schemas are removed afterwards,
    so the checker then validates the exported model through its function bodies, as in a fresh process.
    """
    schemas = [_router_schema()]
    if include_ort_moe:
        schemas.append(_ort_moe_schema())
    added = []
    try:
        for schema in schemas:
            if not defs.has(schema.name, schema.domain):
                defs.register_schema(schema)
                added.append(schema)
        yield
    finally:
        for schema in added:
            defs.deregister_schema(schema.name, schema.since_version, schema.domain)


# --- function bodies -------------------------------------------------------------------------------


class _BodyBuilder:
    """Collects the nodes of a function body and hands out unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._counter = 0

    def _name(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes) -> str | tuple[str, ...]:
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attributes))
        return names[0] if outputs == 1 else tuple(names)

    def constant(self, value, dtype) -> str:
        array = np.asarray(value, dtype=dtype)
        name = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array)))
        return name

    def attribute_int(self, attribute: str) -> str:
        """Return a scalar int64 value that takes the node's integer attribute `attribute`."""
        name = self._name(attribute)
        node = helper.make_node("Constant", [], [name])
        reference = AttributeProto(name="value_int", ref_attr_name=attribute, type=AttributeProto.INT)
        node.attribute.append(reference)
        self.nodes.append(node)
        return name

    def is_finite(self, value: str) -> str:
        return self.op("Not", self.op("Or", self.op("IsNaN", value), self.op("IsInf", value)))


def router_function(variant: RouterVariant) -> onnx.FunctionProto:
    """Build the standard-op body of ``EntropyAdaptiveRouter`` for one attribute combination.

    The body follows `gemoe_cli.routing`. It computes the gating distribution and entropy in float32, and
    ``k`` from the thresholds (``k_max`` for rows with non-finite logits). It keeps the first ``k`` slots
    by descending selection score, resolving ties and NaN scores as `rank_slots` does (lower slot first,
    NaN last). Under ``preserve_mass`` it rescales the kept weights to the full selection's sum.
    """
    b = _BodyBuilder()
    last_axis = b.constant([-1], np.int64)
    zero = b.constant(0.0, np.float32)
    one = b.constant(1.0, np.float32)

    logits = b.op("Cast", "router_logits", to=TensorProto.FLOAT)  # (T, E)
    weights = b.op("Cast", "top_k_weights", to=TensorProto.FLOAT)  # (T, K)

    # Gating distribution over all E experts; a selection bias never enters it.
    sigmoid = None
    if variant.scoring == "softmax":
        distribution = b.op("Softmax", logits, axis=-1)
    elif variant.scoring == "sigmoid":
        sigmoid = b.op("Sigmoid", logits)
        distribution = b.op("Div", sigmoid, b.op("ReduceSum", sigmoid, last_axis, keepdims=1))
    else:
        distribution = logits

    # Entropy in nats; p = 0 contributes 0, the limit of p log p.
    log_p = b.op("Log", b.op("Max", distribution, b.constant(_TINY, np.float32)))
    terms = b.op("Where", b.op("Equal", distribution, zero), zero, b.op("Mul", distribution, log_p))
    entropy = b.op("Neg", b.op("ReduceSum", terms, last_axis, keepdims=0))  # (T,)
    row_not_finite = b.op(
        "Cast",
        b.op("ReduceMax", b.op("Cast", b.op("Not", b.is_finite(logits)), to=TensorProto.FLOAT), last_axis, keepdims=0),
        to=TensorProto.BOOL,
    )  # (T,)
    entropy = b.op("Where", row_not_finite, b.constant(np.nan, np.float32), entropy)

    # k = clamp(k_min + #{j : H > tau_j}, k_min, k_max), and k_max where H is not finite.
    k_min = b.attribute_int("k_min")
    k_max = b.attribute_int("k_max")
    thresholds = b.op("Cast", "thresholds", to=TensorProto.FLOAT)
    crossed = b.op("Greater", b.op("Unsqueeze", entropy, last_axis), thresholds)  # (T, k_max - k_min)
    count = b.op("ReduceSum", b.op("Cast", crossed, to=TensorProto.INT64), last_axis, keepdims=0)  # (T,)
    k = b.op("Min", b.op("Max", b.op("Add", count, k_min), k_min), k_max)
    k = b.op("Where", b.is_finite(entropy), k, k_max)
    b.nodes.append(helper.make_node("Identity", [k], ["experts_per_token"]))

    # Selection scores the router ranks experts by (T, E).
    if variant.has_bias:
        bias = b.op("Cast", "selection_bias", to=TensorProto.FLOAT)
        if variant.bias_on_logits:
            ranking = b.op("Add", logits, bias)
        elif variant.scoring == "softmax":
            ranking = b.op("Add", distribution, bias)
        elif variant.scoring == "sigmoid":
            ranking = b.op("Add", sigmoid, bias)
        else:
            ranking = b.op("Add", logits, bias)
    else:
        ranking = sigmoid if variant.scoring == "sigmoid" else logits

    num_experts = b.op("Squeeze", b.op("Shape", logits, start=-1))  # scalar E
    safe_index = b.op("Clip", "top_k_index", b.constant(0, np.int64), b.op("Sub", num_experts, b.constant(1, np.int64)))
    slot_scores = b.op("GatherElements", ranking, safe_index, axis=1)  # (T, K)
    slot_scores = b.op("Where", b.op("IsNaN", slot_scores), b.constant(-np.inf, np.float32), slot_scores)

    # TopK breaks ties by the lower index, like the stable sort of rank_slots.
    slot_count = b.op("Reshape", k_max, b.constant([1], np.int64))
    _, order = b.op("TopK", slot_scores, slot_count, axis=-1, largest=1, sorted=1, outputs=2)  # (T, M)
    chosen_index = b.op("GatherElements", "top_k_index", order, axis=1)  # (T, M)
    chosen_weights = b.op("GatherElements", weights, order, axis=1)
    positions = b.op("Range", b.constant(0, np.int64), k_max, b.constant(1, np.int64))  # (M,)
    keep = b.op("Less", positions, b.op("Unsqueeze", k, last_axis))  # (T, M)
    kept_weights = b.op("Where", keep, chosen_weights, zero)

    if variant.renormalize == "preserve_mass":
        total = b.op("ReduceSum", weights, last_axis, keepdims=1)  # (T, 1)
        kept_sum = b.op("ReduceSum", kept_weights, last_axis, keepdims=1)
        nonzero = b.op("Not", b.op("Equal", kept_sum, zero))
        scale = b.op("Div", total, b.op("Where", nonzero, kept_sum, one))
        static_k = b.op("Squeeze", b.op("Shape", "top_k_index", start=-1))  # scalar K
        dropped_any = b.op("Unsqueeze", b.op("Less", k, static_k), last_axis)  # (T, 1)
        truncated = b.op("And", b.op("And", dropped_any, nonzero), b.is_finite(scale))
        kept_weights = b.op("Where", truncated, b.op("Mul", kept_weights, scale), kept_weights)

    b.nodes.append(helper.make_node("CastLike", [kept_weights, "top_k_weights"], ["routing_weights"]))
    b.nodes.append(helper.make_node("Where", [keep, chosen_index, num_experts], ["expert_index"]))

    inputs = ["router_logits", "thresholds", "top_k_index", "top_k_weights"]
    if variant.has_bias:
        inputs.append("selection_bias")
    return helper.make_function(
        DOMAIN,
        ROUTER_OP,
        inputs,
        ["routing_weights", "expert_index", "experts_per_token"],
        b.nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
        attributes=["k_min", "k_max", "scoring", "renormalize", "bias_on_logits"],
        overload=variant.overload,
        doc_string=f"Standard-op body of {DOMAIN}::{ROUTER_OP} for {variant.overload}.",
    )


def attach_function_bodies(model) -> list[str]:
    """Give every ``ai.gemoe`` node of an onnx_ir model its overload and the matching function body.

    Returns the overload names in use. The model's IR version is raised to 10 when lower.
    """
    import onnx_ir as ir

    used: dict[str, RouterVariant] = {}
    for node in model.graph.all_nodes():
        if node.domain != DOMAIN:
            continue
        if node.op_type != ROUTER_OP:
            raise ValueError(f"unexpected {DOMAIN} node {node.op_type}; only {ROUTER_OP} has a function body")
        attributes = node.attributes
        has_bias = len(node.inputs) > 4 and node.inputs[4] is not None
        bias_attribute = attributes.get("bias_on_logits")
        variant = RouterVariant(
            scoring=attributes["scoring"].as_string(),
            renormalize=attributes["renormalize"].as_string(),
            has_bias=has_bias,
            bias_on_logits=bool(bias_attribute.as_int()) if bias_attribute is not None else False,
        )
        node.overload = variant.overload
        used[variant.overload] = variant

    for overload, variant in used.items():
        key = (DOMAIN, ROUTER_OP, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(router_function(variant))
    if used:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
    return sorted(used)


def custom_nodes(model_proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Return the main-graph nodes of the ``ai.gemoe`` domain."""
    return [node for node in model_proto.graph.node if node.domain == DOMAIN]
