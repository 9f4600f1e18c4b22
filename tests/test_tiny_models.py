"""Checks that every tiny MoE model in `tiny_models.FAMILIES` builds, runs and honors a top-k override."""

import pytest
import torch

from tests.tiny_models import (
    FAMILIES,
    VOCAB_SIZE,
    build,
    forward_logits,
    get_path,
    input_ids,
    router_modules,
    routing_top_ks,
    selection_biases,
)

# Families that this module must keep providing. Others may be added.
REQUIRED_SUPPORTED = {
    "mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe",
    "olmoe", "flex_olmo", "jamba", "hunyuan_v1_moe", "ernie4_5_moe", "aria", "granitemoe", "granitemoeshared",
    "granitemoehybrid", "cohere2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4v_moe", "dots1", "kimi_linear",
    "gpt_oss", "dbrx", "llama4", "afmoe", "lfm2_moe", "minimax_m2", "gemma4",
}  # fmt: skip
REQUIRED_UNSUPPORTED = {"switch_transformers", "nllb-moe", "phimoe", "zaya", "doge"}

MODEL_TYPES = sorted(FAMILIES)


def _expected_width(model: torch.nn.Module) -> int:
    class_name = type(model).__name__
    if class_name.endswith("ForTokenClassification"):
        return model.config.num_labels
    if class_name.endswith("ForCausalLM"):
        return model.config.vocab_size
    return model.config.hidden_size


def test_families_cover_required_model_types():
    assert REQUIRED_SUPPORTED <= set(FAMILIES), sorted(REQUIRED_SUPPORTED - set(FAMILIES))
    assert REQUIRED_UNSUPPORTED <= set(FAMILIES), sorted(REQUIRED_UNSUPPORTED - set(FAMILIES))
    for model_type in REQUIRED_SUPPORTED:
        assert FAMILIES[model_type].expected_supported, model_type
    for model_type in REQUIRED_UNSUPPORTED:
        assert not FAMILIES[model_type].expected_supported, model_type


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_spec_matches_config_model_type(model_type):
    spec = FAMILIES[model_type]
    config = spec.make_config()

    assert spec.model_type == model_type
    assert config.model_type == model_type


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_returns_finite_output(model_type):
    model = build(model_type)
    ids = input_ids()

    output = forward_logits(model, ids)

    assert not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.get_input_embeddings().num_embeddings <= VOCAB_SIZE
    assert sum(parameter.numel() for parameter in model.parameters()) < 250_000
    assert output.dtype == torch.float32
    assert output.shape == (2, 7, _expected_width(model))
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_top_k_override_reaches_moe_layers(model_type):
    spec = FAMILIES[model_type]
    if spec.top_k_attr is None:
        pytest.skip(f"{model_type} has no top-k setting")
    top_k = spec.default_top_k
    if top_k < 2:
        pytest.skip(f"{model_type} routes top-{top_k}, so there is no smaller top-k")

    default_model = build(model_type)
    overridden_model = build(model_type, top_k=top_k - 1)
    default_values = routing_top_ks(default_model)
    overridden_values = routing_top_ks(overridden_model)

    assert get_path(spec.make_config(top_k - 1), spec.top_k_attr) == top_k - 1
    assert default_values, f"no top-k attribute found on the MoE modules of {model_type}"
    assert set(default_values) == {top_k}
    assert len(overridden_values) == len(default_values)
    assert set(overridden_values) == {top_k - 1}

    # The same seed must give the same weights, so that parity tests can compare the two models.
    default_state = default_model.state_dict()
    overridden_state = overridden_model.state_dict()
    assert default_state.keys() == overridden_state.keys()
    for name, tensor in default_state.items():
        assert torch.equal(tensor, overridden_state[name]), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_routing_parameters_are_random(model_type):
    model = build(model_type)
    routers = router_modules(model)
    biases = selection_biases(model)

    if model_type == "doge":
        # Doge's product-key router is a plain nn.Linear that keeps the default random init.
        assert not routers
    else:
        assert routers, f"no router module found in {model_type}"
    for router_name, router in routers:
        matrices = [parameter for parameter in router.parameters() if parameter.dim() == 2]
        assert matrices, router_name
        for matrix in matrices:
            assert matrix.std() > 0.05, router_name

    if biases:
        ids = input_ids()
        reference = forward_logits(model, ids)
        with torch.no_grad():
            for bias_name, bias in biases:
                assert bias.abs().sum() > 0, bias_name
                bias.zero_()
        unbiased = forward_logits(model, ids)
        # In these families the selection bias only enters the top-k choice, so a changed output means changed choices.
        assert not torch.allclose(reference, unbiased, rtol=0.0, atol=1e-6)


def test_top_k_on_fixed_router_raises():
    with pytest.raises(ValueError, match="fixed top-k"):
        FAMILIES["switch_transformers"].make_config(2)


def test_unknown_model_type_raises():
    with pytest.raises(KeyError, match="no tiny model"):
        build("not_a_family")


def _router_weight_sums(model: torch.nn.Module) -> list[torch.Tensor]:
    sums = []
    handles = [
        router.register_forward_hook(lambda module, args, output: sums.append(output[1].sum(dim=-1)))
        for _, router in router_modules(model)
    ]
    forward_logits(model, input_ids())
    for handle in handles:
        handle.remove()
    return sums


def test_renormalize_gives_unit_weight_sums():
    # qwen2_moe defaults to norm_topk_prob=False, so its top-k softmax weights sum to less than 1.
    plain_sums = _router_weight_sums(build("qwen2_moe"))
    renormalized_sums = _router_weight_sums(build("qwen2_moe", renormalize=True))

    assert plain_sums and renormalized_sums
    for sums in plain_sums:
        assert (sums < 1 - 1e-3).all()
    for sums in renormalized_sums:
        torch.testing.assert_close(sums, torch.ones_like(sums))
