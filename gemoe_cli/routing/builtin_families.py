"""The built-in family table for transformers 5.23 MoE models.

Each entry was checked against the family's modeling code in transformers 5.23: the scoring its router
applies to the logits it returns, where a selection bias lives, and what differs from the common
``(logits, weights, index)`` router plus decorated experts pattern.
"""

from __future__ import annotations

import torch

from gemoe_cli.routing.families import FamilyAdapter, register


def _cohere2_scoring(router) -> str:
    return "sigmoid" if getattr(router, "expert_selection_fn", "softmax") == "sigmoid" else "softmax"


def _dbrx_expert_forward(experts, expert_id: int, inputs: torch.Tensor) -> torch.Tensor:
    # DBRX stores each projection as (E * I, D) and its down projection untransposed.
    mlp = experts.mlp
    shape = (-1, experts.ffn_hidden_size, experts.hidden_size)
    gate = mlp.activation_fn(inputs @ mlp.w1.view(shape)[expert_id].T)
    up = inputs @ mlp.v1.view(shape)[expert_id].T
    return (gate * up) @ mlp.w2.view(shape)[expert_id]


def _llama4_expert_forward(experts, expert_id: int, inputs: torch.Tensor) -> torch.Tensor:
    # Llama 4 keeps (E, D, 2I) and (E, I, D) weights and its routing weight already scales `inputs`.
    gate, up = (inputs @ experts.gate_up_proj[expert_id]).chunk(2, dim=-1)
    return (up * experts.act_fn(gate)) @ experts.down_proj[expert_id]


def _llama4_block_forward(block, hidden_states: torch.Tensor):
    """Route a Llama 4 MoE block through a top-k selection instead of dense per-expert input scaling.

    The original block multiplies every expert's input by a dense score that is zero outside the top-k
    (sigmoid of -inf), so computing only the selected experts gives the same sum.
    """
    hidden_states = hidden_states.reshape(-1, block.hidden_dim)  # (T, D)
    router_scores, router_logits = block.router(hidden_states)  # (T, E) each
    top_k_index = torch.topk(router_logits, block.top_k, dim=-1).indices  # (T, K)
    top_k_weights = router_scores.gather(-1, top_k_index)
    routed = block.experts(hidden_states, top_k_index, top_k_weights)
    out = block.shared_expert(hidden_states)
    out.add_(routed)
    return out, router_logits


_SOFTMAX = (
    ("mixtral", ("mixtral",)),
    ("minimax", ("minimax",)),
    ("qwen2_moe", ("qwen2_moe",)),
    ("qwen3_moe", ("qwen3_moe",)),
    ("qwen3_next", ("qwen3_next",)),
    ("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text")),
    ("qwen3_vl_moe", ("qwen3_vl_moe", "qwen3_vl_moe_text")),
    ("qwen3_omni_moe", ("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text")),
    ("olmoe", ("olmoe",)),
    ("flex_olmo", ("flex_olmo",)),
    ("jamba", ("jamba",)),
    ("hunyuan_v1_moe", ("hunyuan_v1_moe",)),
    ("ernie4_5_moe", ("ernie4_5_moe",)),
    ("aria", ("aria", "aria_text")),
    ("granitemoe", ("granitemoe", "granitemoeshared", "granitemoehybrid")),
    ("deepseek_v2", ("deepseek_v2",)),
    ("gpt_oss", ("gpt_oss",)),
    ("mistral4", ("mistral4",)),
    ("mellum", ("mellum",)),
    ("granitemoe_swa", ("granitemoe_swa",)),
    ("openai_privacy_filter", ("openai_privacy_filter",)),
    ("ernie4_5_vl_moe", ("ernie4_5_vl_moe", "ernie4_5_vl_moe_text")),
    ("mistral_large4", ("mistral_large4", "mistral_large4_text")),
    ("qwen4_exp", ("qwen4_exp", "qwen4_exp_text")),
    ("deepseek_ocr2", ("deepseek_ocr2", "deepseek_ocr2_text")),
    ("unlimited_ocr", ("unlimited_ocr", "unlimited_ocr_text")),
)

_SIGMOID = (
    ("deepseek_v3", ("deepseek_v3",)),
    ("glm4_moe", ("glm4_moe",)),
    ("glm4v_moe", ("glm4v_moe", "glm4v_moe_text")),
    ("dots1", ("dots1",)),
    ("kimi_linear", ("kimi_linear",)),
    ("exaone_moe", ("exaone_moe",)),
    ("solar_open", ("solar_open",)),
    ("laguna", ("laguna",)),
    ("flint", ("flint",)),
    ("glm4_moe_lite", ("glm4_moe_lite",)),
    ("glm_moe_dsa", ("glm_moe_dsa",)),
    ("deepseek_v32", ("deepseek_v32",)),
    ("mimo_v2_flash", ("mimo_v2_flash",)),
    ("hy_v4", ("hy_v4",)),
    ("beam", ("beam",)),
    ("axk1", ("axk1",)),
    ("axk2", ("axk2",)),
    ("bailing_hybrid", ("bailing_hybrid",)),
    ("nemotron_h", ("nemotron_h",)),
    ("glm5_next", ("glm5_next", "glm5_next_text")),
    ("dots3_note", ("dots3_note", "dots3_note_text")),
    ("minimax_m3_vl", ("minimax_m3_vl", "minimax_m3_vl_text")),
    ("muse_spark", ("muse_spark", "muse_spark_text")),
)

for _name, _types in _SOFTMAX:
    register(FamilyAdapter(_name, _types, scoring="softmax"))

for _name, _types in _SIGMOID:
    register(FamilyAdapter(_name, _types, scoring="sigmoid"))

register(FamilyAdapter("cohere2_moe", ("cohere2_moe",), scoring=_cohere2_scoring))

register(FamilyAdapter("kolibri1", ("kolibri1",), scoring="sigmoid", bias_on_logits=True))

# The router's score function comes from `config.scoring_func`; hash routers pick experts by token id.
for _name, _types in (("deepseek_v4", ("deepseek_v4",)), ("inkling2", ("inkling2", "inkling2_text"))):
    register(
        FamilyAdapter(
            _name,
            _types,
            scoring=lambda router: router.score_fn,
            skip_router=lambda router: "Hash" in type(router).__name__,
            note="layers with a hash router pick experts by token id and keep static routing",
        )
    )

register(
    FamilyAdapter(
        "diffusion_gemma",
        ("diffusion_gemma", "diffusion_gemma_text"),
        scoring="probabilities",
        note="the router returns probabilities; per-expert scales apply to the kept weights",
    )
)

# The block owns the selection bias and passes it to the router as an argument.
for _name, _types in (("afmoe", ("afmoe",)), ("lfm2_moe", ("lfm2_moe",)), ("minimax_m2", ("minimax_m2",))):
    register(FamilyAdapter(_name, _types, scoring="sigmoid", bias_from_argument=True))
register(FamilyAdapter("hy_v3", ("hy_v3",), scoring="sigmoid", bias_from_argument=True))

register(
    FamilyAdapter(
        "gemma4",
        ("gemma4", "gemma4_text"),
        scoring="probabilities",
        note="the router returns probabilities; per-expert scales apply to the kept weights",
    )
)

register(
    FamilyAdapter(
        "dbrx",
        ("dbrx",),
        scoring="softmax",
        logits_position=None,
        expert_forward=_dbrx_expert_forward,
        note="experts are not decorated; gemoe replaces their forward with its sparse dispatch",
    )
)

register(
    FamilyAdapter(
        "llama4",
        ("llama4", "llama4_text"),
        scoring="sigmoid",
        logits_position=1,
        block_forward=_llama4_block_forward,
        expert_forward=_llama4_expert_forward,
        note="dense router scores scale expert inputs; gemoe routes the top-k selection sparsely",
        extra={"input_scaled": True},
    )
)

_UNSUPPORTED = {
    "switch_transformers": "it routes each token to a single expert (top-1), so there is no k to adapt",
    "nllb-moe": "its top-2 router picks the second expert by a sampling policy under an expert capacity, "
    "not by a top-k selection",
    "phimoe": "its sparsemixer router derives each expert's multiplier from sequential masked picks, "
    "so a shorter top-k prefix has no defined weights",
    "zaya": "its router can pick a skip expert and feeds router states to the next layer, "
    "so dropping experts would change what later routers see",
    "doge": "its CDMoE layer routes by product keys inside the MLP, "
    "with no experts module that takes a top-k selection",
}

for _type, _reason in _UNSUPPORTED.items():
    register(FamilyAdapter(_type, (_type,), unsupported=_reason))
