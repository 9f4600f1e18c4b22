"""Loading the processor of a vision-language model (`gemoe_cli.vlm.load_processor`)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from gemoe_cli import vlm
from gemoe_cli.errors import InvalidInputError
from tests import tiny_vlms


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_vl_moe")
    return tiny_vlms.save("qwen3_vl_moe", tiny_vlms.build("qwen3_vl_moe"), directory)


def test_processor_loads_for_images(qwen_dir):
    processor = vlm.load_processor(qwen_dir, AutoConfig.from_pretrained(qwen_dir))

    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[tiny_vlms.photo()])

    assert inputs["pixel_values"].shape[0] > 0
    assert processor.chat_template == tiny_vlms.processor("qwen3_vl_moe").chat_template


def test_failed_video_part_falls_back_to_images(qwen_dir, monkeypatch):
    # With torchvision installed, a checkpoint saved without a video processor may fail to load in full.
    monkeypatch.setattr(vlm, "_torchvision_available", lambda: True)
    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", _raise_video_error)

    processor = vlm.load_processor(qwen_dir, AutoConfig.from_pretrained(qwen_dir))

    assert processor.image_processor.to_dict() == tiny_vlms.processor("qwen3_vl_moe").image_processor.to_dict()


def test_processor_error_names_first_failure(tmp_path, monkeypatch):
    model_dir = tiny_vlms.save("qwen3_vl_moe", tiny_vlms.build("qwen3_vl_moe"), tmp_path / "model")
    (tmp_path / "model" / "preprocessor_config.json").unlink()
    (tmp_path / "model" / "processor_config.json").unlink()
    monkeypatch.setattr(vlm, "_torchvision_available", lambda: True)
    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", _raise_video_error)

    with pytest.raises(InvalidInputError, match="cannot load the processor of .*: video settings rejected"):
        vlm.load_processor(model_dir, AutoConfig.from_pretrained(model_dir))


def _raise_video_error(*args, **kwargs):
    raise ValueError("video settings rejected")
