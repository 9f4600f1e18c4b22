"""Adaptive routing on full vision-language models: image+text parity, token modalities and their counters."""

import math

import pytest
import torch

from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from gemoe_cli.routing.modality import IMAGE, TEXT, placeholder_token_ids, token_modalities
from gemoe_cli.vlm import forward_module
from tests import tiny_vlms

FAMILIES = sorted(tiny_vlms.VLMS)
TOLERANCE = 1e-5
QUESTION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the photo."}]},
    {"role": "assistant", "content": "An astronaut in a white suit."},
]


def _inputs(model_type, photo="astronaut"):
    if model_type == "llama4":
        return tiny_vlms.llama4_inputs(QUESTION, tiny_vlms.photo(photo))
    processor = tiny_vlms.processor(model_type)
    text = processor.apply_chat_template(QUESTION, tokenize=False)
    return dict(processor(text=[text], images=[tiny_vlms.photo(photo)], return_tensors="pt"))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_vlms.build(request.param)
    return request.param, model, _inputs(request.param)


def _logits(model, inputs):
    with torch.no_grad():
        return forward_module(model)(**inputs, use_cache=False).logits


def test_static_thresholds_match_original(family):
    model_type, model, inputs = family
    reference = _logits(model, inputs)

    with attach_adaptive_routing(model, {}, sparse_dispatch=False) as routing:
        same_dispatch = _logits(model, inputs)
        tokens = sum(counters.tokens for counters in routing.counters().values())
    with attach_adaptive_routing(model, {}):
        sparse_dispatch = _logits(model, inputs)

    assert tokens > 0
    assert (same_dispatch - reference).abs().max().item() <= TOLERANCE
    assert (sparse_dispatch - reference).abs().max().item() <= TOLERANCE


def test_image_tokens_reach_moe_layers(family):
    model_type, model, inputs = family
    placeholders = placeholder_token_ids(model.config)
    expected_images = int(token_modalities(inputs["input_ids"], placeholders).eq(IMAGE).sum())

    with attach_adaptive_routing(model, {}) as routing:
        _logits(model, inputs)
        counters = routing.counters()

    assert expected_images > 100
    seen = [counts.modality_tokens("image") for counts in counters.values()]
    if model_type == "ernie4_5_vl_moe":
        # Vision experts also route the start and end markers around the image.
        assert max(seen) == expected_images + 2
    else:
        assert max(seen) == expected_images


def test_adaptive_outputs_finite_and_sparse(family):
    model_type, model, inputs = family
    entropies = {}
    with attach_adaptive_routing(model, {}) as routing:
        for layer in routing.layers.values():
            layer.observers.append(lambda event: entropies.setdefault(event.path, event.entropy))
        _logits(model, inputs)
        k_max = {path: layer.k_max for path, layer in routing.layers.items()}
    thresholds = {
        path: torch.quantile(values, torch.linspace(0, 1, k_max[path] + 1)[1:-1]).tolist()
        for path, values in entropies.items()
    }

    with attach_adaptive_routing(model, thresholds) as routing:
        logits = _logits(model, inputs)
        sparsity = routing.sparsity()

    assert torch.isfinite(logits).all()
    assert sparsity > 0.1


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "glm4v_moe", "aria", "llama4"])
def test_modality_counters_match_independent_count(model_type):
    model = tiny_vlms.build(model_type)
    inputs = _inputs(model_type, "coffee")
    codes = token_modalities(inputs["input_ids"], placeholder_token_ids(model.config)).reshape(-1)  # (T,)
    blocks = find_moe_blocks(model)
    slots = blocks[0].top_k - 1
    text_thresholds = [0.5, 1.0, 1.5][:slots]
    image_thresholds = [1.7, 1.9, 2.0][:slots]

    logits = {}
    handles = []
    for block in blocks:
        position = block.adapter.logits_position

        def keep(module, args, output, path=block.path, position=position):
            logits[path] = (output if position is None else output[position]).detach()

        handles.append(block.router.register_forward_hook(keep))
    modality_thresholds = {block.path: {"text": text_thresholds, "image": image_thresholds} for block in blocks}
    try:
        with attach_adaptive_routing(model, {}, modality_thresholds=modality_thresholds) as routing:
            _logits(model, inputs)
            counters = routing.counters()
    finally:
        for handle in handles:
            handle.remove()

    for block in blocks:
        scores = logits[block.path].float().reshape(-1, block.num_experts)
        if block.scoring == "sigmoid":
            distribution = torch.sigmoid(scores) / torch.sigmoid(scores).sum(-1, keepdim=True)
        else:
            distribution = torch.softmax(scores, dim=-1)
        entropy = -(distribution * distribution.clamp_min(1e-30).log()).sum(-1)
        for name, code, thresholds in (("text", TEXT, text_thresholds), ("image", IMAGE, image_thresholds)):
            # k = 1 + the number of thresholds the entropy exceeds, counted per modality by hand.
            k = 1 + (entropy[codes == code].unsqueeze(-1) > torch.tensor(thresholds)).sum(-1)
            expected = torch.bincount(k, minlength=slots + 2).tolist()
            assert counters[block.path].modality_k_histograms[name] == expected, (block.path, name)
        assert counters[block.path].tokens == codes.numel()


def test_modality_thresholds_apply_to_their_tokens():
    model = tiny_vlms.build("qwen3_vl_moe")
    inputs = _inputs("qwen3_vl_moe")
    # Text tokens keep all four experts, image tokens engage one.
    by_modality = {"text": [-math.inf] * 3, "image": [math.inf] * 3}

    with attach_adaptive_routing(model, {}) as routing:
        paths = list(routing.layers)
    with attach_adaptive_routing(model, {}, modality_thresholds={p: by_modality for p in paths}) as routing:
        _logits(model, inputs)
        counters = routing.counters()
        modality_sparsity = routing.modality_sparsity()

    for path in paths:
        assert counters[path].modality_k_histograms["text"][:4] == [0, 0, 0, 0]
        assert counters[path].modality_k_histograms["image"][2:] == [0, 0, 0]
    assert modality_sparsity == {"text": 0.0, "image": 0.75}


def test_ernie_expert_blocks_have_fixed_modality():
    model = tiny_vlms.build("ernie4_5_vl_moe")
    inputs = _inputs("ernie4_5_vl_moe")

    with attach_adaptive_routing(model, {}) as routing:
        _logits(model, inputs)
        counters = routing.counters()
        fixed = {path: layer.fixed_modality for path, layer in routing.layers.items()}

    for path, counts in counters.items():
        expected = "image" if path.endswith("vision_moe") else "text"
        assert fixed[path] == (IMAGE if expected == "image" else TEXT)
        assert set(counts.modality_k_histograms) == {expected}
        assert counts.modality_tokens(expected) == counts.tokens


def test_tracker_cleared_after_failed_forward():
    model = tiny_vlms.build("qwen3_vl_moe")
    inputs = _inputs("qwen3_vl_moe")
    broken = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * 2}

    with attach_adaptive_routing(model, {}) as routing:
        tracker = next(iter(routing.layers.values())).tracker
        with pytest.raises(Exception):  # noqa: B017 - any failure inside the model's forward
            _logits(model, broken)
        assert tracker.codes is None
        _logits(model, inputs)
        assert tracker.codes is None


def test_text_only_model_has_no_tracker():
    from tests import tiny_models

    model = tiny_models.build("qwen3_moe")
    with attach_adaptive_routing(model, {}) as routing:
        assert not routing.tracks_modality
        tiny_models.forward_logits(model, tiny_models.input_ids())
        assert routing.modality_sparsity() == {}


def test_modality_thresholds_for_unknown_layer_rejected():
    model = tiny_vlms.build("qwen3_vl_moe")
    with pytest.raises(ValueError, match="not a MoE block"):
        attach_adaptive_routing(model, {}, modality_thresholds={"model.nowhere": {"image": [0.0, 0.0, 0.0]}})


def test_unknown_modality_name_rejected():
    model = tiny_vlms.build("qwen3_vl_moe")
    with attach_adaptive_routing(model, {}) as routing:
        paths = list(routing.layers)
    with pytest.raises(ValueError, match="unknown modality 'pixels'"):
        attach_adaptive_routing(model, {}, modality_thresholds={paths[0]: {"pixels": [0.0, 0.0, 0.0]}})
