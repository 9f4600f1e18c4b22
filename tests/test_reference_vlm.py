"""Tests of the reference vision-language model trainer, on tiny models.

The full model trains only in `scripts/train_reference_vlm`, which took 5 to 11 minutes on a shared 2-core CPU.
These tests build models of about 60,000 parameters and train them for a few steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from gemoe_cli import reference_model, reference_vlm
from gemoe_cli.calibration.images import builtin_image
from gemoe_cli.reference_vlm import (
    IMAGE_TOKEN,
    EvaluationData,
    ImageTextCorpus,
    PhotoCaptions,
    ReferenceVLMSettings,
)

# A model small enough that a whole build, evaluations included, takes seconds. Images are at most 64 x 64
# pixels, which is 4 image tokens.
TINY_SETTINGS = ReferenceVLMSettings(
    vocab_size=400,
    hidden_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    vision_depth=1,
    vision_hidden_size=16,
    vision_intermediate_size=16,
    vision_num_heads=1,
    min_pixels=32 * 32,
    max_pixels=64 * 64,
    min_train_pixels=32 * 32,
    image_batch_size=2,
    text_batch_size=2,
    text_seq_len=256,
    steps=3,
    warmup_steps=1,
    heldout_eval_every=2,
    eval_batch_size=64,
)


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run each test's torch work on one thread, then restore the thread count (see test_reference_model.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus() -> ImageTextCorpus:
    return reference_vlm.load_image_text_corpus(TINY_SETTINGS)


@pytest.fixture(scope="module")
def processor(corpus: ImageTextCorpus):
    tokenizer = reference_vlm.train_vlm_tokenizer(corpus.tokenizer_texts(), TINY_SETTINGS)
    return reference_vlm.build_processor(tokenizer, TINY_SETTINGS)


def _sampler(corpus: ImageTextCorpus, processor, settings: ReferenceVLMSettings) -> reference_vlm.BatchSampler:
    text_tokens = reference_model.encode_documents(processor.tokenizer, corpus.split.train_segments[:300])
    generator = torch.Generator().manual_seed(settings.seed)
    return reference_vlm.BatchSampler(corpus, processor, text_tokens, settings, generator)


# --- Data ------------------------------------------------------------------------------------------------------


def test_captions_cover_builtin_photographs() -> None:
    photos = reference_vlm.load_photo_captions()

    assert len(photos) == 18
    assert len({entry.photo for entry in photos}) == 18
    for entry in photos:
        assert builtin_image(entry.photo).mode == "RGB"
        assert len(entry.captions) >= 3, entry.photo


def test_captions_differ_from_builtin_answers() -> None:
    from gemoe_cli.calibration.images import BUILTIN_IMAGES, read_image_text_samples

    answers = {
        item["text"] if isinstance(item, dict) else item
        for sample in read_image_text_samples(BUILTIN_IMAGES)
        for message in sample.messages
        if message["role"] == "assistant"
        for item in (message["content"] if isinstance(message["content"], list) else [message["content"]])
    }
    questions = {
        item["text"] if isinstance(item, dict) else item
        for sample in read_image_text_samples(BUILTIN_IMAGES)
        for message in sample.messages
        if message["role"] == "user"
        for item in (message["content"] if isinstance(message["content"], list) else [message["content"]])
        if not isinstance(item, dict) or item.get("type") == "text"
    }
    captions = {caption for entry in reference_vlm.load_photo_captions() for caption in entry.captions}

    assert answers
    assert captions.isdisjoint(answers)
    assert set(reference_vlm.TRAINING_PROMPTS).isdisjoint(questions)


def test_heldout_captions_are_not_trained_on(corpus: ImageTextCorpus) -> None:
    trained = {caption for entry in corpus.photos for caption in entry.captions}
    heldout = {caption for entry in corpus.heldout for caption in entry.captions}

    assert len(heldout) == 18 * TINY_SETTINGS.heldout_captions_per_photo
    assert trained.isdisjoint(heldout)
    assert heldout.isdisjoint(corpus.tokenizer_texts())
    assert [entry.photo for entry in corpus.heldout] == [entry.photo for entry in corpus.photos]


def test_holding_out_every_caption_is_rejected() -> None:
    with pytest.raises(ValueError, match="heldout_captions_per_photo=4 leaves none to train on"):
        reference_vlm.load_image_text_corpus(dataclasses.replace(TINY_SETTINGS, heldout_captions_per_photo=4))


def test_data_hash_changes_with_captions(corpus: ImageTextCorpus) -> None:
    first = corpus.photos[0]
    changed = dataclasses.replace(
        corpus, photos=(PhotoCaptions(first.photo, (*first.captions[:-1], "Another caption.")), *corpus.photos[1:])
    )

    assert corpus.sha256() == reference_vlm.load_image_text_corpus(TINY_SETTINGS).sha256()
    assert changed.sha256() != corpus.sha256()
    assert dataclasses.replace(corpus, prompts=("Describe it.",)).sha256() != corpus.sha256()
    assert dataclasses.replace(corpus, heldout=corpus.heldout[1:]).sha256() != corpus.sha256()


def test_key_changes_with_inputs() -> None:
    key = reference_vlm.reference_vlm_key(TINY_SETTINGS, "a" * 64)

    assert key == reference_vlm.reference_vlm_key(TINY_SETTINGS, "a" * 64)
    assert key != reference_vlm.reference_vlm_key(TINY_SETTINGS, "b" * 64)
    assert key != reference_vlm.reference_vlm_key(dataclasses.replace(TINY_SETTINGS, seed=1), "a" * 64)
    assert key != reference_vlm.reference_vlm_key(dataclasses.replace(TINY_SETTINGS, max_pixels=96 * 96), "a" * 64)


def test_settings_report_every_problem() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok=5 exceeds num_experts=4") as raised:
        ReferenceVLMSettings(num_experts=4, num_experts_per_tok=5, min_train_pixels=10, experts_implementation="x")
    message = str(raised.value)
    assert "min_train_pixels=10 must be in [min_pixels=4096, max_pixels=65536]" in message
    assert "experts_implementation='x'" in message


def test_mrope_sections_sum_to_half_head() -> None:
    assert reference_vlm.mrope_sections(32) == [6, 5, 5]
    assert reference_vlm.mrope_sections(16) == [4, 2, 2]
    assert sum(reference_vlm.mrope_sections(128)) == 64


# --- Processor and augmentation ----------------------------------------------------------------------------


def test_processor_encodes_builtin_image(processor) -> None:
    from gemoe_cli.calibration.images import chat_messages
    from gemoe_cli.calibration.multimodal import render_chat

    image = builtin_image("astronaut")  # 512 x 512, scaled to 64 x 64 by the processor
    text = render_chat(processor, chat_messages("What is this?", 1, "An astronaut."), add_generation_prompt=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")

    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>")
    assert encoded["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64 / 16 patches per side
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((encoded["input_ids"] == image_token_id).sum()) == 4  # 4 x 4 patches merged 2 x 2
    assert int(encoded["mm_token_type_ids"].sum()) == 4
    assert processor.tokenizer.decode(encoded["input_ids"][0, -3:-1]).endswith("<|im_end|>")


def test_augment_photo_sizes_and_determinism() -> None:
    settings = dataclasses.replace(TINY_SETTINGS, max_pixels=256 * 256, min_train_pixels=96 * 96)
    photo = builtin_image("coffee")  # 600 x 400

    first = [reference_vlm.augment_photo(photo, settings, torch.Generator().manual_seed(3)) for _ in range(2)]
    generator = torch.Generator().manual_seed(4)
    drawn = [reference_vlm.augment_photo(photo, settings, generator) for _ in range(20)]

    assert first[0].tobytes() == first[1].tobytes()
    for image in drawn:
        width, height = image.size
        assert width % 32 == 0, image.size
        assert height % 32 == 0, image.size
        assert width * height <= settings.max_pixels, image.size
    assert len({image.size for image in drawn}) > 3
    assert len({image.tobytes() for image in drawn}) == 20


def test_augment_photo_keeps_small_crops_valid() -> None:
    photo = Image.new("RGB", (20, 10), "red")
    image = reference_vlm.augment_photo(photo, TINY_SETTINGS, torch.Generator().manual_seed(0))

    assert image.size[0] % 32 == 0
    assert image.size[1] % 32 == 0
    assert image.size[0] * image.size[1] <= TINY_SETTINGS.max_pixels


def test_heldout_samples_are_deterministic(corpus: ImageTextCorpus) -> None:
    settings = dataclasses.replace(TINY_SETTINGS, heldout_crops_per_caption=2)

    first = reference_vlm.heldout_samples(corpus, settings)
    second = reference_vlm.heldout_samples(corpus, settings)

    assert len(first) == 18 * 2
    assert [sample.name for sample in first] == [sample.name for sample in second]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second, strict=True))
    assert first[0].name == "astronaut-heldout0-0"
    assert first[0].caption == corpus.heldout[0].captions[0]
    assert first[0].image.tobytes() != first[1].image.tobytes()
    assert {sample.prompt for sample in first} == set(reference_vlm.TRAINING_PROMPTS)


def test_evaluation_samples_with_training_captions(corpus: ImageTextCorpus) -> None:
    samples = reference_vlm.evaluation_samples(corpus, TINY_SETTINGS, "trained", crops_per_caption=1)
    heldout = {caption for entry in corpus.heldout for caption in entry.captions}

    assert len(samples) == sum(len(entry.captions) for entry in corpus.photos)
    assert samples[1].name == "astronaut-trained1-0"
    assert heldout.isdisjoint(sample.caption for sample in samples)
    with pytest.raises(ValueError, match="captions='all' is not one of heldout, trained"):
        reference_vlm.evaluation_samples(corpus, TINY_SETTINGS, "all")


def test_write_evaluation_set_reads_as_dataset(tmp_path: Path) -> None:
    from gemoe_cli.calibration.images import open_image, read_image_text_samples
    from gemoe_cli.errors import InvalidInputError

    settings = dataclasses.replace(TINY_SETTINGS, heldout_crops_per_caption=1)
    samples_file = reference_vlm.write_evaluation_set(tmp_path / "heldout", settings)
    samples = read_image_text_samples(str(samples_file))

    assert samples_file == tmp_path / "heldout" / "samples.jsonl"
    assert len(samples) == 18
    assert samples[0].has_answer
    expected = reference_vlm.heldout_samples(reference_vlm.load_image_text_corpus(settings), settings)
    assert open_image(samples[0].images[0]).tobytes() == expected[0].image.tobytes()
    with pytest.raises(InvalidInputError, match="already exists"):
        reference_vlm.write_evaluation_set(tmp_path / "heldout", settings)


def test_cli_rejects_existing_evaluation_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()

    exit_code = reference_vlm.main(["--write-eval-set", str(tmp_path / "taken")])

    assert exit_code == 2
    assert "evaluation set" in capsys.readouterr().err
    assert list((tmp_path / "taken").iterdir()) == []


def test_collate_masks_padding_and_image_tokens() -> None:
    image_token_id, pad_token_id = 9, 0
    rows = [
        {
            "input_ids": torch.tensor([[5, 9, 9, 6]]),
            "mm_token_type_ids": torch.tensor([[0, 1, 1, 0]]),
            "pixel_values": torch.ones(8, 3),
            "image_grid_thw": torch.tensor([[1, 2, 4]]),
        },
        {"input_ids": torch.tensor([[7, 8]])},
    ]

    inputs, labels = reference_vlm.collate(rows, pad_token_id, image_token_id)

    assert inputs["input_ids"].tolist() == [[5, 9, 9, 6], [7, 8, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert inputs["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert labels.tolist() == [[5, -100, -100, 6], [7, 8, -100, -100]]
    assert inputs["pixel_values"].shape == (8, 3)
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 4]]


def test_expert_load_distance_by_layer() -> None:
    load = {
        "image": [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
        "heldout_text": [[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]],
    }

    distances = reference_vlm.expert_load_distance(load)

    assert distances == pytest.approx([1.0, 0.0, 0.2])


# --- Training and evaluation -----------------------------------------------------------------------------------


def test_few_steps_lower_loss(corpus: ImageTextCorpus, processor) -> None:
    settings = dataclasses.replace(TINY_SETTINGS, steps=20, warmup_steps=2, learning_rate=1e-2)
    with reference_model.seeded_torch(settings.seed, settings.deterministic_algorithms):
        model = reference_vlm.build_vlm(settings, processor.tokenizer)
        full = reference_vlm.load_evaluation_data(processor, corpus, settings, model.config)
        data = EvaluationData(
            full.image_text[:6], full.heldout_captions[:6], full.text_windows[:4], full.image_token_id
        )
        before = reference_vlm.evaluate_vlm(model, data, settings.eval_batch_size)
        result = reference_vlm.train_vlm(model, _sampler(corpus, processor, settings), settings, progress=False)
        after = reference_vlm.evaluate_vlm(model, data, settings.eval_batch_size)

    assert after.answer_loss < before.answer_loss - 0.1
    assert after.heldout_caption_loss < before.heldout_caption_loss - 0.1
    assert after.heldout_text_loss < before.heldout_text_loss - 0.1
    assert result.loss_curve[-1][0] == 20
    assert before.tokens["image"] == sum(int((b.input_ids == full.image_token_id).sum()) for b in data.image_text)
    assert before.tokens["heldout_text"] == data.text_windows.numel()
    assert set(before.mean_normalized_entropy) == {"image", "text", "heldout_text"}


def test_evaluation_without_text_windows(processor) -> None:
    from gemoe_cli.calibration.multimodal import MultimodalBatch

    with reference_model.seeded_torch(TINY_SETTINGS.seed, TINY_SETTINGS.deterministic_algorithms):
        model = reference_vlm.build_vlm(TINY_SETTINGS, processor.tokenizer)
    inputs = reference_vlm.encode_image_text(processor, builtin_image("coins"), "Describe this image.", "Old coins.")
    batch = MultimodalBatch(inputs, torch.ones_like(inputs["input_ids"], dtype=torch.bool), prompt_length=1)
    data = EvaluationData((batch,), (), torch.zeros((0, 8), dtype=torch.long), model.config.image_token_id)

    evaluation = reference_vlm.evaluate_vlm(model, data, TINY_SETTINGS.eval_batch_size)

    assert evaluation.heldout_text_tokens == 0
    assert math.isnan(evaluation.heldout_text_loss)
    assert math.isnan(evaluation.heldout_caption_loss)
    assert evaluation.answer_tokens == inputs["input_ids"].size(1) - 1
    assert set(evaluation.mean_normalized_entropy) == {"image", "text"}


def test_training_is_reproducible(corpus: ImageTextCorpus, processor) -> None:
    states = []
    for _ in range(2):
        with reference_model.seeded_torch(TINY_SETTINGS.seed, TINY_SETTINGS.deterministic_algorithms):
            model = reference_vlm.build_vlm(TINY_SETTINGS, processor.tokenizer)
            reference_vlm.train_vlm(model, _sampler(corpus, processor, TINY_SETTINGS), TINY_SETTINGS, progress=False)
        states.append(model.state_dict())

    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_evaluation_leaves_training_unchanged(corpus: ImageTextCorpus, processor) -> None:
    settings = dataclasses.replace(TINY_SETTINGS, steps=4, heldout_eval_every=2)
    states = []
    curves = []
    for evaluate in (False, True):
        with reference_model.seeded_torch(settings.seed, settings.deterministic_algorithms):
            model = reference_vlm.build_vlm(settings, processor.tokenizer)
            data = None
            if evaluate:
                full = reference_vlm.load_evaluation_data(processor, corpus, settings, model.config)
                data = EvaluationData(
                    full.image_text[:2], full.heldout_captions[:2], full.text_windows[:2], full.image_token_id
                )
            sampler = _sampler(corpus, processor, settings)
            result = reference_vlm.train_vlm(model, sampler, settings, evaluation_data=data, progress=False)
        states.append(model.state_dict())
        curves.append(result.eval_curve)

    assert curves[0] == ()
    assert [step for step, _ in curves[1]] == [2, 4]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_tiny_build_is_cached_and_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from gemoe_cli.models import load_config
    from gemoe_cli.vlm import load_processor

    first = reference_vlm.ensure_reference_vlm(tmp_path, progress=False, settings=TINY_SETTINGS)
    modified = (first / "model.safetensors").stat().st_mtime_ns
    second = reference_vlm.ensure_reference_vlm(tmp_path, progress=False, settings=TINY_SETTINGS)

    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == modified
    assert first.name.startswith(reference_vlm.MODEL_DIR_PREFIX)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []

    model = AutoModelForImageTextToText.from_pretrained(first, local_files_only=True)
    assert model.config.model_type == "qwen3_vl_moe"
    processor = load_processor(str(first), load_config(str(first)))
    assert processor.image_processor.size["longest_edge"] == TINY_SETTINGS.max_pixels

    record = json.loads((first / "training.json").read_text(encoding="utf-8"))
    assert record["cache_key"] == first.name.removeprefix(reference_vlm.MODEL_DIR_PREFIX)
    assert record["settings"]["steps"] == TINY_SETTINGS.steps
    assert [point["step"] for point in record["training"]["eval_curve"]] == [2, 3]
    evaluation = record["evaluation"]
    assert set(evaluation["trained"]["mean_normalized_entropy"]) == {"image", "text", "heldout_text"}
    # Routers drawn with unit-variance logits are far from uniform, unlike transformers' initialisation.
    for group in ("image", "text", "heldout_text"):
        random_init = evaluation["random_init"]["mean_normalized_entropy"][group]
        assert evaluation["random_unit_variance_routers"]["mean_normalized_entropy"][group] < random_init - 0.05
    assert "reference VLM" in reference_vlm.format_summary(first)


def test_changed_settings_use_new_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []

    def record_build(output_dir: Path, settings, corpus, *, key: str, progress: bool) -> dict:
        for file_name in reference_vlm.REQUIRED_FILES:
            (output_dir / file_name).write_text(key, encoding="utf-8")
        built.append(output_dir)
        return {}

    monkeypatch.setattr(reference_vlm, "build_reference_vlm", record_build)

    first = reference_vlm.ensure_reference_vlm(tmp_path, progress=False, settings=TINY_SETTINGS)
    again = reference_vlm.ensure_reference_vlm(tmp_path, progress=False, settings=TINY_SETTINGS)
    changed = reference_vlm.ensure_reference_vlm(
        tmp_path, progress=False, settings=dataclasses.replace(TINY_SETTINGS, steps=4)
    )

    assert again == first
    assert changed != first
    assert len(built) == 2
    assert first == reference_vlm.reference_vlm_path(tmp_path, TINY_SETTINGS)
