"""Tiny random-weight float32 MoE models for the MoE families of transformers 5.23, built from configs only.

`FAMILIES` maps each config `model_type` to a `TinySpec`, and `build(model_type)` returns a model with hidden
size 32, a 128-token vocabulary, eager attention, 8 routed experts and top-k 4. The exceptions are stated in each
entry: 16 experts where expert groups or a product-key router need them, top-k 2 for llama4 and phimoe and top-1
for zaya, and four blocks for nemotron_h, whose MoE layers are blocks of their own. Every layer that can be an MoE
layer is one, and hybrid stacks get one layer of each attention kind. Vision-language and omni families build only
their text stack. Nothing is downloaded: every model comes from `CONFIG_MAPPING[model_type](...)` and a model
class constructor.

`build` also redraws routing weights that transformers initializes in a way that hides routing behavior. Router
weights get a standard deviation of 1 / sqrt(fan_in), so that gate distributions differ from token to token
(some families initialize routers to zero, and `initializer_range=0.02` gives near-uniform gates). Selection
biases, which transformers initializes to zero, get small random values, so a rewritten router that drops them
changes the output. See `build` for the exact distributions.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB_SIZE = 128
NUM_EXPERTS = 8
DEFAULT_TOP_K = 4
SELECTION_BIAS_STD = 0.1
ROUTER_BIAS_STD = 0.1

# Names of the routing-bias tensors that are added to the router scores or logits only to choose the top-k experts.
SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")

# Names of the attributes and config fields that hold the number of experts each token uses.
TOP_K_NAMES = ("top_k", "topk", "num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")

# Router modules are found by class name. The exclusions are gates that do not route tokens to experts.
_ROUTER_CLASS_PATTERN = re.compile(r"(Router|Gate)$")
_NOT_ROUTER_CLASS_PATTERN = re.compile(r"(ForgetGate|ResidualGate|GatedResidual)$")
_MOE_BLOCK_CLASS_PATTERN = re.compile(r"(MoE|Moe)$")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Recipe for one tiny MoE model.

    `make_config(top_k=None)` returns the full config of the family, with the top-k attribute set to `top_k` when it
    is given. `model_class_name` names the transformers class that `build` instantiates, from the full config or,
    when `sub_config` is set, from the nested config at that dotted path (for example "text_config").
    `top_k_attr` is the dotted path from the full config to the attribute that sets how many experts each token uses,
    or None where the architecture fixes it. `expected_supported` is False for the families that adaptive routing
    must reject.
    """

    model_type: str
    make_config: Callable[..., PreTrainedConfig]
    model_class_name: str
    top_k_attr: str | None
    expected_supported: bool = True
    sub_config: str | None = None

    @property
    def model_class(self) -> Any:
        """The transformers class named by `model_class_name`, imported on first use."""
        return getattr(transformers, self.model_class_name)

    @property
    def default_top_k(self) -> int | None:
        """Top-k of the config built without an override, or None when `top_k_attr` is None."""
        if self.top_k_attr is None:
            return None
        return get_path(self.make_config(), self.top_k_attr)


def get_path(obj: Any, dotted: str) -> Any:
    """Return the attribute at a dotted path such as "text_config.num_experts_per_tok"."""
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _set_nested(kwargs: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `value` at a dotted path inside nested keyword dictionaries, creating levels that are missing."""
    *parents, leaf = dotted.split(".")
    level = kwargs
    for name in parents:
        level = level.setdefault(name, {})
    level[leaf] = value


def _deep_copy_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy_kwargs(value) if isinstance(value, Mapping) else value for key, value in kwargs.items()}


def _make_config(
    model_type: str, kwargs: Mapping[str, Any], top_k_attr: str | None, top_k: int | None = None
) -> PreTrainedConfig:
    config_kwargs = _deep_copy_kwargs(kwargs)
    if top_k is not None:
        if top_k_attr is None:
            raise ValueError(f"{model_type} has a fixed top-k, so top_k={top_k} cannot be set; pass top_k=None")
        _set_nested(config_kwargs, top_k_attr, top_k)

    config = CONFIG_MAPPING[model_type](**config_kwargs)

    if top_k is not None and get_path(config, top_k_attr) != top_k:
        actual = get_path(config, top_k_attr)
        raise ValueError(f"{model_type}: {top_k_attr} is {actual} after setting it to {top_k}, so the override failed")
    return config


# Keyword arguments shared by the decoder-only text configs. Keys that a config class does not define are stored
# as plain attributes and ignored by its model.
_DECODER = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Multi-head latent attention (DeepSeek-V2 style) sizes. Its eager attention does not repeat key/value heads, so
# there are as many key/value heads as query heads.
_MLA = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}

# Top-k sparse attention indexer (DeepSeek-V3.2 style) sizes.
_INDEXER = {"index_topk": 4, "index_head_dim": 8, "index_n_heads": 2}


# Plain rotary embedding for families whose released config uses YaRN. Their YaRN factor assumes a context of
# thousands of tokens and makes transformers warn at max_position_embeddings=128, and the rotary type does not
# affect routing.
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _decoder(**overrides: Any) -> dict[str, Any]:
    return {**_DECODER, **overrides}


_SPECS: list[TinySpec] = []


def _add(
    model_type: str,
    kwargs: Mapping[str, Any],
    top_k_attr: str | None,
    model_class_name: str = "AutoModelForCausalLM",
    sub_config: str | None = None,
    expected_supported: bool = True,
) -> None:
    make_config = functools.partial(_make_config, model_type, kwargs, top_k_attr)
    _SPECS.append(TinySpec(model_type, make_config, model_class_name, top_k_attr, expected_supported, sub_config))


# --- Families whose routers pick a configurable top-k ---------------------------------------------------------------

_add("mixtral", _decoder(num_local_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K), "num_experts_per_tok")
_add(
    "minimax",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        layer_types=["linear_attention", "full_attention"],
        block_size=4,
    ),
    "num_experts_per_tok",
)
_add("minimax_m2", _decoder(num_local_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K), "num_experts_per_tok")
_add(
    "qwen2_moe",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "num_experts_per_tok",
)
_add(
    "qwen3_moe",
    _decoder(num_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K, decoder_sparse_step=1, mlp_only_layers=[]),
    "num_experts_per_tok",
)

_QWEN_LINEAR_ATTENTION = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_conv_kernel_dim": 4,
}
_add(
    "qwen3_next",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **_QWEN_LINEAR_ATTENTION,
    ),
    "num_experts_per_tok",
)
_add(
    "qwen3_5_moe",
    {
        "text_config": _decoder(
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            shared_expert_intermediate_size=32,
            **_QWEN_LINEAR_ATTENTION,
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Qwen3_5MoeForCausalLM",
    sub_config="text_config",
)
_add(
    "qwen3_vl_moe",
    {
        "text_config": _decoder(
            num_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K, decoder_sparse_step=1, mlp_only_layers=[]
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Qwen3VLMoeTextModel",
    sub_config="text_config",
)
_add(
    "qwen3_omni_moe",
    {
        "thinker_config": {
            "text_config": _decoder(
                num_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K, decoder_sparse_step=1, mlp_only_layers=[]
            )
        }
    },
    "thinker_config.text_config.num_experts_per_tok",
    model_class_name="Qwen3OmniMoeThinkerTextModel",
    sub_config="thinker_config.text_config",
)
_add("olmoe", _decoder(num_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K), "num_experts_per_tok")
_add("flex_olmo", _decoder(num_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K), "num_experts_per_tok")
_add(
    "jamba",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
    ),
    "num_experts_per_tok",
)
_add("hunyuan_v1_moe", _decoder(num_experts=NUM_EXPERTS, moe_topk=DEFAULT_TOP_K), "moe_topk")
_add(
    "ernie4_5_moe",
    _decoder(
        moe_num_experts=NUM_EXPERTS,
        moe_k=DEFAULT_TOP_K,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        moe_layer_end_index=1,
        moe_layer_interval=1,
    ),
    "moe_k",
)
_add(
    "aria",
    {"text_config": _decoder(moe_num_experts=NUM_EXPERTS, moe_topk=DEFAULT_TOP_K, moe_num_shared_experts=1)},
    "text_config.moe_topk",
    model_class_name="AriaTextForCausalLM",
    sub_config="text_config",
)
_add("granitemoe", _decoder(num_local_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K), "num_experts_per_tok")
_add(
    "granitemoeshared",
    _decoder(num_local_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K, shared_intermediate_size=32),
    "num_experts_per_tok",
)
_add(
    "granitemoehybrid",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
    ),
    "num_experts_per_tok",
)
_add(
    "cohere2_moe",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        layer_types=["sliding_attention", "full_attention"],
        mlp_layer_types=["sparse", "sparse"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "deepseek_v2",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        first_k_dense_replace=0,
        **_MLA,
    ),
    "num_experts_per_tok",
)
_add(
    "deepseek_v3",
    # Group-limited routing ranks each group by its two best scores, so 16 experts in 4 groups of 4.
    _decoder(
        n_routed_experts=16,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=0,
        **_MLA,
    ),
    "num_experts_per_tok",
)
_add(
    "glm4_moe",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
    ),
    "num_experts_per_tok",
)
_add(
    "glm4v_moe",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            # The multimodal rotary embedding splits its head_dim * partial_rotary_factor / 2 = 4 frequencies
            # into temporal, height and width sections, which must add up.
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Glm4vMoeTextModel",
    sub_config="text_config",
)
_add(
    "dots1",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
    ),
    "num_experts_per_tok",
)
_add(
    "kimi_linear",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_token=DEFAULT_TOP_K,
        num_shared_experts=1,
        num_expert_group=1,
        topk_group=1,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["linear_attention", "full_attention"],
        linear_head_dim=8,
        linear_num_heads=4,
        **_MLA,
    ),
    "num_experts_per_token",
)
_add(
    "gpt_oss",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        rope_parameters=_DEFAULT_ROPE,
    ),
    "num_experts_per_tok",
)
_add(
    "dbrx",
    {
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 128,
        "vocab_size": VOCAB_SIZE,
        # NOTE: two workarounds for DbrxAttention in transformers 5.23. It reads `attn_config.rope_theta`, which
        # DbrxAttentionConfig does not define (the rotary embedding itself reads `rope_parameters`), and with the
        # default clip_qkv=None it calls `clamp(min=None, max=None)`, which raises. Released DBRX uses clip_qkv=8.
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": NUM_EXPERTS, "moe_top_k": DEFAULT_TOP_K},
    },
    "ffn_config.moe_top_k",
)
# llama4 is the one supported family with top-k 2, so tests also cover a family whose smaller top-k is 1.
_add(
    "llama4",
    {
        "text_config": _decoder(
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=2,
            intermediate_size_mlp=64,
            moe_layers=[0, 1],
            interleave_moe_layer_step=1,
            attention_chunk_size=4,
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Llama4ForCausalLM",
    sub_config="text_config",
)
_add(
    "afmoe",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        num_shared_experts=1,
        num_dense_layers=0,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "lfm2_moe",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        num_dense_layers=0,
        layer_types=["conv", "full_attention"],
    ),
    "num_experts_per_tok",
)
_add(
    "gemma4",
    {
        "text_config": _decoder(
            enable_moe_block=True,
            num_experts=NUM_EXPERTS,
            top_k_experts=DEFAULT_TOP_K,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB_SIZE,
            per_layer_config={},
        )
    },
    "text_config.top_k_experts",
    model_class_name="Gemma4ForCausalLM",
    sub_config="text_config",
)

# --- Other families whose experts use @use_experts_implementation -------------------------------------------------

_add(
    "exaone_moe",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        num_shared_experts=1,
        first_k_dense_replace=0,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        n_group=1,
        topk_group=1,
    ),
    "num_experts_per_tok",
)
_add(
    "flint",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "granitemoe_swa",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "glm4_moe_lite",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        mlp_layer_types=["sparse", "sparse"],
        **_MLA,
    ),
    "num_experts_per_tok",
)
_add(
    "glm_moe_dsa",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        mlp_layer_types=["sparse", "sparse"],
        **_MLA,
        **_INDEXER,
    ),
    "num_experts_per_tok",
)
_add(
    "deepseek_v32",
    _decoder(
        n_routed_experts=16,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=0,
        mlp_layer_types=["sparse", "sparse"],
        **_MLA,
        **_INDEXER,
    ),
    "num_experts_per_tok",
)
_add(
    "mistral4",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        **_MLA,
        # head_dim must be qk_nope_head_dim + qk_rope_head_dim. Only YaRN applies partial_rotary_factor (0.5 here)
        # to make the rotary part qk_rope_head_dim wide, so the family keeps YaRN, with the released
        # original_max_position_embeddings scaled down to max_position_embeddings / factor.
        head_dim=16,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale_all_dim": 1.0,
            "mscale": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    ),
    "num_experts_per_tok",
    model_class_name="Mistral4ForCausalLM",
)
_add(
    "solar_open",
    _decoder(
        n_routed_experts=NUM_EXPERTS, num_experts_per_tok=DEFAULT_TOP_K, n_shared_experts=1, n_group=1, topk_group=1
    ),
    "num_experts_per_tok",
)
_add(
    "mimo_v2_flash",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_group=1,
        topk_group=1,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
        v_head_dim=8,
    ),
    "num_experts_per_tok",
)
_add(
    "hy_v3",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        num_shared_experts=1,
        mlp_layer_types=["sparse", "sparse"],
    ),
    "num_experts_per_tok",
)
_add(
    "hy_v4",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        mlp_layer_types=["sparse", "sparse"],
        **_MLA,
        **_INDEXER,
    ),
    "num_experts_per_tok",
)
_add(
    "kolibri1",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_expert_intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "laguna",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        shared_expert_intermediate_size=32,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["full_attention", "full_attention"],
        num_attention_heads_per_layer=[4, 4],
    ),
    "num_experts_per_tok",
)
_add(
    "mellum",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["full_attention", "full_attention"],
    ),
    "num_experts_per_tok",
)
_add(
    "beam",
    _decoder(
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_group=1,
        topk_group=1,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    ),
    "num_experts_per_tok",
)
_add(
    "axk1",
    _decoder(
        n_routed_experts=16,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        mlp_layer_types=["sparse", "sparse"],
        **_MLA,
    ),
    "num_experts_per_tok",
)
_add(
    "axk2",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        mlp_layer_types=["sparse", "sparse"],
        gated_norm_rank=4,
        **_MLA,
        **_INDEXER,
    ),
    "num_experts_per_tok",
)
_add(
    "bailing_hybrid",
    _decoder(
        num_experts=16,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=0,
        mlp_layer_types=["sparse", "sparse"],
        layer_types=["linear_attention", "full_attention"],
        layer_group_size=2,
        linear_head_dim=8,
        linear_num_heads=4,
        **_MLA,
    ),
    "num_experts_per_tok",
)
# Nemotron-H layers are single blocks (Mamba, attention, MoE or MLP), so two MoE layers take four blocks.
_add(
    "nemotron_h",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        moe_shared_expert_intermediate_size=32,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=1,
        ssm_state_size=8,
        chunk_size=8,
    ),
    "num_experts_per_tok",
)
_add(
    "openai_privacy_filter",
    _decoder(
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        intermediate_size=32,
        num_labels=5,
        rope_parameters=_DEFAULT_ROPE,
    ),
    "num_experts_per_tok",
    model_class_name="OpenAIPrivacyFilterForTokenClassification",
)
_add(
    "deepseek_v4",
    _decoder(
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=DEFAULT_TOP_K,
        n_shared_experts=1,
        # The released config starts with "hash_moe" layers, which look experts up by token id and have no
        # learned top-k choice, so both layers here are gated "moe" layers.
        mlp_layer_types=["moe", "moe"],
        num_key_value_heads=1,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=4,
        **_INDEXER,
    ),
    "num_experts_per_tok",
)
_add(
    "ernie4_5_vl_moe",
    {
        "text_config": _decoder(
            moe_num_experts=NUM_EXPERTS,
            moe_k=DEFAULT_TOP_K,
            moe_num_shared_experts=1,
            moe_intermediate_size=[32, 32],
            mlp_layer_types=["sparse", "sparse"],
            # The 3D rotary embedding splits head_dim / 2 = 4 frequencies into height, width and time sections.
            rope_parameters={**_DEFAULT_ROPE, "mrope_section": [1, 1, 2]},
        )
    },
    "text_config.moe_k",
    model_class_name="Ernie4_5_VLMoeTextModel",
    sub_config="text_config",
)
_add(
    "glm5_next",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            mlp_layer_types=["sparse", "sparse"],
            layer_types=["linear_attention", "indexed_attention"],
            linear_head_dim=8,
            linear_num_heads=4,
            # The config requires attention without a rotary part (NoPE) and as many key/value heads as query heads.
            **{**_MLA, "qk_rope_head_dim": 0, "qk_nope_head_dim": 16},
            # The indexer pools keys in blocks of index_kpool=16, and index_topk must be a multiple of it.
            **{**_INDEXER, "index_topk": 16},
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Glm5NextTextModel",
    sub_config="text_config",
)
_add(
    "dots3_note",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            shared_experts_intermediate_size=32,
            mlp_layer_types=["sparse", "sparse"],
            layer_types=["indexed_attention", "sliding_attention"],
            sliding_window=4,
            per_layer_config={},
            **_MLA,
            **_INDEXER,
            # The sliding-window layers use plain attention with head_dim = qk_nope_head_dim + qk_rope_head_dim.
            head_dim=16,
        ),
        # The config validates that the vision and audio adapters project to the text hidden size.
        "vision_config": {"adapter_out_dim": 32},
        "audio_config": {"adapter_out_dim": 32},
    },
    "text_config.num_experts_per_tok",
    model_class_name="Dots3NoteForCausalLM",
    sub_config="text_config",
)
_add(
    "minimax_m3_vl",
    {
        "text_config": _decoder(
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            dense_intermediate_size=64,
            shared_intermediate_size=32,
            mlp_layer_types=["sparse", "sparse"],
            layer_types=["full_attention", "full_attention"],
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="MiniMaxM3VLForCausalLM",
    sub_config="text_config",
)
_add(
    "mistral_large4",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            mlp_layer_types=["sparse", "sparse"],
            rope_parameters=_DEFAULT_ROPE,
            **_MLA,
            **_INDEXER,
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="MistralLarge4TextModel",
    sub_config="text_config",
)
_add(
    "muse_spark",
    {
        "text_config": _decoder(
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            moe_hidden_size=32,
            mlp_layer_types=["sparse", "sparse"],
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
        # The config validates that the audio and vision encoders project to the text hidden size.
        "audio_config": {"out_hidden_size": 32},
        "out_hidden_size": 32,
    },
    "text_config.num_experts_per_tok",
    model_class_name="MuseSparkTextModel",
    sub_config="text_config",
)
_add(
    "inkling2",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            unpadded_vocab_size=VOCAB_SIZE,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=8,
            sliding_window_size=4,
            rel_extent=4,
            d_rel=4,
            n_layers_per_attn_res_block=1,
        ),
        # The config validates that the vision projector outputs the text hidden size.
        "vision_config": {"text_hidden_size": 32},
    },
    "text_config.num_experts_per_tok",
    model_class_name="Inkling2ForCausalLM",
    sub_config="text_config",
)
_add(
    "qwen4_exp",
    {
        "text_config": _decoder(
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            shared_expert_intermediate_size=32,
            ngram_vocab_size_base=VOCAB_SIZE,
            heads_per_ngram=2,
            hc_lowrank=8,
            **{**_QWEN_LINEAR_ATTENTION, "layer_types": ["linear_attention", "indexed_attention"]},
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=4,
            indexer_compress_ratio=2,
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="Qwen4ExpForCausalLM",
    sub_config="text_config",
)
_add(
    "deepseek_ocr2",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            mlp_layer_types=["sparse", "sparse"],
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="DeepseekOcr2TextModel",
    sub_config="text_config",
)
_add(
    "unlimited_ocr",
    {
        "text_config": _decoder(
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=DEFAULT_TOP_K,
            n_shared_experts=1,
            mlp_layer_types=["sparse", "sparse"],
            layer_types=["full_attention", "full_attention"],
            # The attention does not repeat key/value heads.
            num_key_value_heads=4,
        )
    },
    "text_config.num_experts_per_tok",
    model_class_name="UnlimitedOcrTextModel",
    sub_config="text_config",
)

_add(
    "diffusion_gemma",
    {
        "text_config": _decoder(
            num_experts=NUM_EXPERTS,
            top_k_experts=DEFAULT_TOP_K,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            per_layer_config={},
        )
    },
    "text_config.top_k_experts",
    model_class_name="DiffusionGemmaEncoderTextModel",
    sub_config="text_config",
)

# --- Families with a fixed top-1 or top-2 router, or a router that adaptive routing cannot rewrite -----------------

_add(
    "switch_transformers",
    {
        "vocab_size": VOCAB_SIZE,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "num_experts": NUM_EXPERTS,
        "encoder_sparse_step": 1,
        "decoder_sparse_step": 1,
        # At least the 14 tokens of the default (2, 7) batch, so no token is dropped there.
        "expert_capacity": 16,
        "router_jitter_noise": 0.0,
    },
    None,
    model_class_name="SwitchTransformersEncoderModel",
    expected_supported=False,
)
_add(
    "nllb-moe",
    {
        "vocab_size": VOCAB_SIZE,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "num_experts": NUM_EXPERTS,
        "encoder_sparse_step": 1,
        "decoder_sparse_step": 1,
        # At least the 14 tokens of the default (2, 7) batch, so no token is dropped there.
        "expert_capacity": 16,
        "max_position_embeddings": 128,
    },
    None,
    model_class_name="NllbMoeModel",
    expected_supported=False,
)
# PhiMoE's sparsemixer always picks two experts and ignores num_experts_per_tok.
_add(
    "phimoe",
    _decoder(num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "num_experts_per_tok",
    expected_supported=False,
)
# Zaya routes top-1 over the experts plus a skip expert that does no compute.
_add(
    "zaya",
    _decoder(num_experts=NUM_EXPERTS, num_experts_per_tok=1, router_hidden_size=16),
    "num_experts_per_tok",
    expected_supported=False,
)
# Doge's product-key router reaches floor(sqrt(num_experts))**2 experts, so the expert count is a square.
_add(
    "doge",
    _decoder(is_moe=True, num_experts=16, num_experts_per_tok=DEFAULT_TOP_K),
    "num_experts_per_tok",
    expected_supported=False,
)

FAMILIES: dict[str, TinySpec] = {spec.model_type: spec for spec in _SPECS}


def build(model_type: str, top_k: int | None = None, seed: int = 0, *, renormalize: bool = False) -> PreTrainedModel:
    """Build the tiny model of `model_type` in float32 eval mode, with randomized routers and selection biases.

    `top_k` overrides the config attribute `FAMILIES[model_type].top_k_attr`.

    `renormalize=True` sets `norm_topk_prob=True` (kimi_linear and bailing_hybrid map it to `moe_renormalize`), so
    that the top-k gate weights sum to 1 before any routed scaling factor. Families without the flag keep their
    fixed behavior. Most of them always renormalize (mixtral, for example), but jamba, deepseek_ocr2 and
    unlimited_ocr never do, and openai_privacy_filter divides the renormalized weights by top-k. deepseek_v2
    defines the flag, but its router in transformers 5.23 does not read it.

    The model is built under `torch.manual_seed(seed)`, so the same seed gives the same weights for any `top_k`
    (top-k changes no parameter shape). After construction, router weights are redrawn from N(0, 1 / fan_in),
    1-D router biases from N(0, ROUTER_BIAS_STD**2) and `per_expert_scale` vectors from U(0.5, 1.5). Selection
    biases (`SELECTION_BIAS_NAMES`, which transformers initializes to zero) are drawn from
    N(0, SELECTION_BIAS_STD**2), which changes the expert choice of some tokens in every family that has one.
    """
    if model_type not in FAMILIES:
        raise KeyError(f"no tiny model for model_type {model_type!r}; known: {', '.join(sorted(FAMILIES))}")
    spec = FAMILIES[model_type]

    torch.manual_seed(seed)
    config = spec.make_config(top_k)
    model_config = get_path(config, spec.sub_config) if spec.sub_config else config
    if renormalize and hasattr(model_config, "norm_topk_prob"):
        model_config.norm_topk_prob = True
    model_class = spec.model_class
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(model_config, attn_implementation="eager", dtype=torch.float32)
    else:
        model = model_class._from_config(model_config, attn_implementation="eager", dtype=torch.float32)
    model = model.float().eval()

    with torch.no_grad():
        _randomize_routers(model)
        _randomize_selection_biases(model)
    return model


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the (name, module) pairs of the modules that score experts, found by class name.

    Doge has no match because its product-key router is a plain `nn.Linear` inside `DogeCDMoE`.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if _ROUTER_CLASS_PATTERN.search(type(module).__name__)
        and not _NOT_ROUTER_CLASS_PATTERN.search(type(module).__name__)
    ]


def selection_biases(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Return the (name, tensor) pairs of the bias parameters and buffers added to gate scores before selection."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(name, tensor) for name, tensor in tensors if name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES]


def routing_top_ks(model: nn.Module) -> list[int]:
    """Return the top-k values that the MoE layers of `model` read, one per module that stores one.

    The scan covers each router, the module that contains it (the MoE block) and every module whose class name ends
    in "MoE" or "Moe". A router that stores no top-k attribute itself reads it from its `config` at forward time
    (Gemma 4 and DiffusionGemma read `config.top_k_experts`), and that config value is returned in its place.
    """
    modules = dict(model.named_modules())
    scanned: dict[int, nn.Module] = {}
    routers: list[nn.Module] = []
    for name, router in router_modules(model):
        routers.append(router)
        scanned[id(router)] = router
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        scanned[id(modules[parent_name])] = modules[parent_name]
    for module in modules.values():
        if _MOE_BLOCK_CLASS_PATTERN.search(type(module).__name__):
            scanned[id(module)] = module

    values = [value for module in scanned.values() for value in _own_top_ks(module)]
    for router in routers:
        router_config = getattr(router, "config", None)
        if not _own_top_ks(router) and router_config is not None:
            values.extend(_own_top_ks(router_config))
    return values


def _own_top_ks(obj: Any) -> list[int]:
    attributes = vars(obj) if isinstance(obj, nn.Module) else {name: getattr(obj, name, None) for name in TOP_K_NAMES}
    return [
        value
        for name, value in attributes.items()
        if name in TOP_K_NAMES and isinstance(value, int) and not isinstance(value, bool)
    ]


def _randomize_routers(model: nn.Module) -> None:
    for _, router in router_modules(model):
        for name, parameter in router.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in SELECTION_BIAS_NAMES:
                continue
            if parameter.dim() == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[-1]))
            elif leaf == "bias":
                parameter.normal_(0.0, ROUTER_BIAS_STD)
            elif leaf == "per_expert_scale":
                parameter.uniform_(0.5, 1.5)


def _randomize_selection_biases(model: nn.Module) -> None:
    for _, bias in selection_biases(model):
        bias.normal_(0.0, SELECTION_BIAS_STD)


def input_ids(batch: int = 2, seq: int = 7, vocab: int = VOCAB_SIZE, seed: int = 0) -> torch.Tensor:
    """Return a (batch, seq) int64 tensor of token ids drawn uniformly from [3, vocab).

    Ids 0-2 are left out because the tiny configs use them as pad, BOS and EOS ids.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Run `model` on `ids` without a KV cache and return float32 logits, or the last hidden state if it has no head.

    Encoder-decoder models (nllb-moe) get `ids` as decoder input too, so the output is the decoder's.
    """
    kwargs: dict[str, Any] = {"input_ids": ids}
    parameters = inspect.signature(model.forward).parameters
    if "decoder_input_ids" in parameters:
        kwargs["decoder_input_ids"] = ids
    if "use_cache" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs["use_cache"] = False

    with torch.no_grad():
        output = model(**kwargs)
    logits = getattr(output, "logits", None)
    tensor = logits if logits is not None else output.last_hidden_state
    return tensor.float()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """Return a byte-level BPE tokenizer with at most `VOCAB_SIZE` tokens, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Routers send each token to a few experts.",
        "A confident router needs fewer experts than an uncertain one.",
        "def add(a, b):\n    return a + b",
        "Le routeur choisit les experts. Der Router waehlt Experten.",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def save_with_tokenizer(model: PreTrainedModel, directory) -> str:
    """Save `model` and `tiny_tokenizer()` to `directory` and return its path as a string."""
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)
