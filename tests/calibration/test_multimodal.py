"""Encoding image+text samples, per-modality statistics and retention on image+text data."""

import json
import math

import pytest
import torch
from PIL import Image

from gemoe_cli.calibration.bad_samples import BadSamples, SampleError
from gemoe_cli.calibration.calibrate import calibrate, collect_statistics
from gemoe_cli.calibration.data import read_samples
from gemoe_cli.calibration.images import (
    BUILTIN_IMAGES,
    ImageSource,
    ImageTextSample,
    chat_messages,
    read_image_text_samples,
)
from gemoe_cli.calibration.multimodal import build_multimodal_data, encode_sample
from gemoe_cli.calibration.retention import evaluate
from gemoe_cli.calibration.statistics import keyed_by_modality, modality_key
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.routing import attach_adaptive_routing
from gemoe_cli.routing.modality import placeholder_token_ids
from tests import tiny_vlms

MODEL_TYPE = "qwen3_vl_moe"


@pytest.fixture(scope="module")
def processor():
    return tiny_vlms.processor(MODEL_TYPE)


@pytest.fixture(scope="module")
def model():
    return tiny_vlms.build(MODEL_TYPE)


@pytest.fixture(scope="module")
def placeholders():
    return {token for ids in placeholder_token_ids(tiny_vlms.config(MODEL_TYPE)).values() for token in ids}


def _sample(answer="A cup of coffee.", images=("coffee",), text="What is this?"):
    sources = [ImageSource(skimage_name=name) for name in images]
    return ImageTextSample(chat_messages(text, len(sources), answer), sources, "test line 1")


def _encode(sample, processor, placeholders, max_images=None, max_tokens=None):
    return encode_sample(sample, processor, placeholders, max_images=max_images, max_tokens=max_tokens)


def test_answer_tokens_are_scored(processor, placeholders):
    batch = _encode(_sample(), processor, placeholders)
    tokenizer = processor.tokenizer

    scored = batch.input_ids[batch.target_mask]
    assert tokenizer.decode(scored).startswith("A cup of coffee.")
    assert batch.target_mask[0, : batch.prompt_length].sum() == 0
    assert batch.answer_length == int(batch.target_mask.sum())
    assert tokenizer.decode(batch.prompt_inputs()["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_prompt_inputs_keep_images(processor, placeholders):
    batch = _encode(_sample(), processor, placeholders)
    prompt = batch.prompt_inputs()

    assert prompt["input_ids"].size(1) == batch.prompt_length
    assert prompt["attention_mask"].size(1) == batch.prompt_length
    assert torch.equal(prompt["pixel_values"], batch.inputs["pixel_values"])


def test_without_answer_text_after_images_scored(processor, placeholders):
    batch = _encode(_sample(answer=None, text="Tell me about it."), processor, placeholders)
    ids = batch.input_ids[0]
    last_image = max(i for i, token in enumerate(ids.tolist()) if token in placeholders)

    assert batch.prompt_length == last_image + 1
    assert processor.tokenizer.decode(ids[batch.target_mask[0]]).startswith("<|vision_end|>Tell me about it.")


def test_too_many_images(processor, placeholders):
    with pytest.raises(SampleError, match="has 2 images, more than the limit of 1") as caught:
        _encode(_sample(images=("coffee", "rocket")), processor, placeholders, max_images=1)
    assert caught.value.kind == "too many images"


def test_too_many_tokens(processor, placeholders):
    with pytest.raises(SampleError, match=r"above the model's limit of 100 positions") as caught:
        _encode(_sample(), processor, placeholders, max_tokens=100)
    assert caught.value.kind == "too many tokens"


def test_two_images_give_two_placeholder_runs(processor, placeholders):
    batch = _encode(_sample(images=("coffee", "rocket")), processor, placeholders)

    assert int(batch.inputs["image_grid_thw"].size(0)) == 2
    starts = (batch.input_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum()
    assert int(starts) == 2


def _bad_dataset(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "green.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        {"image": "green.png", "text": "Colour?", "answer": "Green."},
        {"image": "missing.png", "text": "Colour?", "answer": "Unknown."},
        {"image": "broken.png", "text": "Colour?", "answer": "Unknown."},
        {"image": "skimage:coffee", "text": "What is this?", "answer": "Coffee."},
        {"image": ["green.png", "green.png"], "text": "Same?", "answer": "Yes."},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _build(samples, processor, placeholders, skip, **overrides):
    settings = dict(num_samples=10, seed=0, heldout_fraction=0.3, max_images=1, max_tokens=None)
    settings.update(overrides)
    return build_multimodal_data(
        samples, processor, "data.jsonl", placeholders=placeholders, bad_samples=BadSamples(skip), **settings
    )


def test_bad_samples_counted_when_skipping(tmp_path, processor, placeholders):
    samples = read_image_text_samples(str(_bad_dataset(tmp_path)))

    data = _build(samples, processor, placeholders, skip=True)

    assert data.fit_count + data.heldout_count == 2
    assert data.bad_samples["skipped"] == 3
    assert data.bad_samples["by_kind"] == {
        "missing image": 1,
        "too many images": 1,
        "unsupported image format": 1,
    }
    assert any("line 2" in message and "missing.png" in message for message in data.bad_samples["first"])


def test_bad_sample_stops_with_line_number(tmp_path, processor, placeholders):
    samples = read_image_text_samples(str(_bad_dataset(tmp_path)))

    with pytest.raises(InvalidInputError, match=r"data.jsonl line \d: .*--skip-bad-samples"):
        _build(samples, processor, placeholders, skip=False)


def test_too_few_good_samples(tmp_path, processor, placeholders):
    samples = read_image_text_samples(str(_bad_dataset(tmp_path)))[:3]

    with pytest.raises(InvalidInputError, match="1 usable image\\+text samples \\(2 skipped\\)"):
        _build(samples, processor, placeholders, skip=True)


def test_text_model_rejects_image_samples(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [{"text": "Plain text is fine."}, {"image": "skimage:coffee", "text": "What is this?"}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"mixed.jsonl line 2: .*text-only"):
        read_samples(str(path))

    bad = BadSamples(skip=True)
    samples = read_samples(str(path), bad)
    assert samples == [[{"role": "user", "content": "Plain text is fine."}]]
    assert bad.counts == {"image for a text-only model": 1}


def test_text_model_with_only_image_samples(tmp_path):
    with pytest.raises(InvalidInputError, match="no text-only samples"):
        read_samples(BUILTIN_IMAGES, BadSamples(skip=True))


@pytest.fixture(scope="module")
def builtin_data(processor, placeholders):
    samples = read_image_text_samples(BUILTIN_IMAGES)
    return _build(samples, processor, placeholders, skip=False, num_samples=5, heldout_fraction=0.4, max_images=None)


def test_statistics_split_by_modality(model, builtin_data):
    with attach_adaptive_routing(model, {}) as routing:
        statistics, _ = collect_statistics(model, routing, builtin_data.batches("fit", 1), static=True)

    assert set(statistics.modalities) == {"text", "image"}
    for path, layer in statistics.layers.items():
        parts = [statistics.modalities[name].layers[path] for name in ("text", "image")]
        assert sum(part.tokens for part in parts) == layer.tokens
        assert (parts[0].counts + parts[1].counts == layer.counts).all()
    keyed = keyed_by_modality(statistics)
    assert set(keyed.layers) == {modality_key(path, name) for path in statistics.layers for name in ("text", "image")}


def test_statistics_round_trip_with_modalities(model, builtin_data):
    from gemoe_cli.calibration.statistics import CalibrationStatistics

    with attach_adaptive_routing(model, {}) as routing:
        statistics, _ = collect_statistics(model, routing, builtin_data.batches("fit", 1), static=True)
    restored = CalibrationStatistics.from_json(json.loads(json.dumps(statistics.to_json())))

    merged = restored.merge(statistics)
    for name, by_layer in statistics.modalities.items():
        for path, layer in by_layer.layers.items():
            assert (merged.modalities[name].layers[path].counts == 2 * layer.counts).all()


def test_static_routing_retains_everything(model, builtin_data):
    with attach_adaptive_routing(model, {}) as routing:
        evaluation = evaluate(model, routing, builtin_data.batches("heldout", 1))

    assert evaluation.retention("nll") == pytest.approx(1.0, abs=1e-6)
    assert evaluation.exact_match == 1.0
    assert evaluation.sparsity == 0.0
    assert evaluation.modality_sparsity == {"text": 0.0, "image": 0.0}
    assert evaluation.tokens == sum(int(batch.target_mask[:, 1:].sum()) for batch in builtin_data.heldout)


def test_answer_checks_leave_counters_alone(model, builtin_data):
    with attach_adaptive_routing(model, {}) as routing:
        evaluation = evaluate(model, routing, builtin_data.batches("heldout", 1))
        counted = sum(counters.tokens for counters in routing.counters().values())

    forwarded = sum(batch.numel() for batch in builtin_data.heldout)
    assert counted == forwarded * len(routing.layers)
    assert evaluation.exact_match is not None


def test_per_modality_calibration_fits_each_modality(model, builtin_data):
    with attach_adaptive_routing(model, {}) as routing:
        result = calibrate(
            model, routing, builtin_data, target_sparsity=0.3, min_retention=None, policy="uniform", per_modality=True
        )

    assert set(result.modality_thresholds) == set(result.thresholds)
    for path, by_modality in result.modality_thresholds.items():
        assert set(by_modality) == {"text", "image"}
        assert result.thresholds[path] == [-math.inf] * 3
    assert 0.15 < result.heldout.sparsity < 0.45
    assert set(result.heldout.modality_sparsity) == {"text", "image"}


def test_per_modality_needs_two_modalities(model):
    from gemoe_cli.calibration.data import CalibrationData

    text_only = torch.randint(10, 300, (2, 16))  # no image placeholder, so every token is text
    data = CalibrationData("ids", text_only[:1], text_only[1:], 2, 32)
    with attach_adaptive_routing(model, {}) as routing:
        with pytest.raises(InvalidInputError, match="one modality \\(text\\)"):
            calibrate(model, routing, data, target_sparsity=0.3, min_retention=None, per_modality=True)
