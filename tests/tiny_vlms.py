"""Tiny random-weight MoE vision-language models with vision towers and processors, built offline.

`VLMS` maps a `model_type` to a `TinyVLM`. Each entry builds a full transformers config (text stack, vision
tower, and the image token ids of a tokenizer built here), names the processor class the model ships with, and
has a chat template in the layout of that family's released template. `build(model_type)` returns the model in
float32 eval mode with routers redrawn as in `tests.tiny_models.build`. `processor(model_type)` assembles the
processor from `tiny_tokenizer(model_type)` and the image processor class with its default settings. Nothing is
downloaded.

Two limits of the environment shape this module:

- transformers 5.23 makes every video processor require torchvision, and the processors of qwen3_vl_moe,
  glm4v_moe, ernie4_5_vl_moe and qwen3_omni_moe reject a missing video processor. `processor` therefore builds
  them through `gemoe_cli.vlm.image_only_processor`, the same fallback `gemoe calibrate` uses without torchvision.
- llama4's image processor requires torchvision and has no PIL variant, so llama4 has a processor only where
  torchvision is installed (`has_processor`). `llama4_inputs` builds its model inputs (tiles, placeholder
  tokens) by hand, in the layout of `Llama4Processor` in transformers 5.23, for everywhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import CONFIG_MAPPING, PreTrainedTokenizerFast

from tests import tiny_models

VOCAB_SIZE = 320
NUM_EXPERTS = 8
TOP_K = 4

_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    # Images become hundreds of tokens, so the position limit is far above the text-only zoo's 128.
    "max_position_embeddings": 8192,
}

_CORPUS = (
    "An astronaut in a white spacesuit stands in front of the American flag.",
    "A tabby cat looks straight at the camera with its green eyes.",
    "A cup of coffee with latte art sits on a saucer next to a spoon.",
    "Describe the photo in one sentence. What is in this picture?",
    "How many coins are there? What colour is the rocket?",
)

# Chat templates in the layout of each family's released template, reduced to what the tests render.
_CONTENT_LOOP = (
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}IMAGE{% elif c.type == 'text' %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}"
)


def _chat_template(turn_start: str, turn_end: str, image: str, generation_prompt: str) -> str:
    content = _CONTENT_LOOP.replace("IMAGE", image)
    return (
        "{% for m in messages %}" + turn_start + content + turn_end + "{% endfor %}"
        "{% if add_generation_prompt %}" + generation_prompt + "{% endif %}"
    )


_QWEN_TEMPLATE = _chat_template(
    "<|im_start|>{{ m.role }}\n",
    "<|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_start|>assistant\n",
)


@dataclasses.dataclass(frozen=True)
class TinyVLM:
    """One tiny vision-language model: how to build its config, tokenizer and processor.

    `special_tokens` maps tokenizer attribute names (`image_token`, ...) to token strings; they are added as
    special tokens, so each is one id. `make_config(ids)` gets the token ids by token string. `processor_class`
    names the transformers processor; `image_processor_class` the image processor built with default
    settings. `requires_torchvision` marks an image processor that cannot be built without torchvision.
    """

    model_type: str
    special_tokens: dict[str, str]
    make_config: Callable[[dict[str, int]], Any]
    chat_template: str
    processor_class: str | None
    image_processor_class: str | None
    extra_tokens: tuple[str, ...] = ()
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"
    requires_torchvision: bool = False


@functools.cache
def tiny_tokenizer(model_type: str) -> PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer trained here, with the family's special tokens as single ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = VLMS[model_type]
    specials = [spec.pad_token, spec.eos_token, *spec.special_tokens.values(), *spec.extra_tokens]
    specials = list(dict.fromkeys(specials))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    extra = {name: token for name, token in spec.special_tokens.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        extra_special_tokens=extra,
        chat_template=spec.chat_template,
    )


def token_ids(model_type: str) -> dict[str, int]:
    """Return the id of every special token of the family's tokenizer, by token string."""
    tokenizer = tiny_tokenizer(model_type)
    spec = VLMS[model_type]
    tokens = [spec.pad_token, spec.eos_token, *spec.special_tokens.values(), *spec.extra_tokens]
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def config(model_type: str):
    """Return the full config of the tiny model, with the tokenizer's special token ids."""
    return VLMS[model_type].make_config(token_ids(model_type))


def build(model_type: str, seed: int = 0) -> nn.Module:
    """Build the tiny VLM in float32 eval mode, with routers and selection biases redrawn as in `tiny_models`."""
    from gemoe_cli.vlm import model_class_for

    torch.manual_seed(seed)
    full_config = config(model_type)
    model_class = model_class_for(full_config)
    create = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
    model = create(full_config, dtype=torch.float32)
    model = model.float().eval()
    with torch.no_grad():
        tiny_models._randomize_routers(model)
        tiny_models._randomize_selection_biases(model)
    return model


def has_processor(model_type: str) -> bool:
    """Return whether the family's processor can be built here (llama4's needs torchvision)."""
    from transformers.utils import is_torchvision_available

    return not VLMS[model_type].requires_torchvision or is_torchvision_available()


def processor(model_type: str):
    """Assemble the family's processor from the tiny tokenizer and a default-settings image processor."""
    import transformers

    from gemoe_cli.vlm import image_only_processor

    spec = VLMS[model_type]
    if not has_processor(model_type):
        raise ValueError(f"the {model_type} processor requires torchvision, which is not installed; use llama4_inputs")
    image_processor = getattr(transformers, spec.image_processor_class)()
    tokenizer = tiny_tokenizer(model_type)
    processor_class = getattr(transformers, spec.processor_class)
    parts = {}
    if "feature_extractor" in processor_class.get_attributes():
        # Qwen3-Omni's audio feature extractor; image+text samples never call it.
        parts["feature_extractor"] = transformers.WhisperFeatureExtractor(feature_size=16)
    return image_only_processor(processor_class, image_processor, tokenizer, spec.chat_template, **parts)


def save(model_type: str, model: nn.Module, directory) -> str:
    """Save the model, the tokenizer and the processor files (as a released checkpoint has them)."""
    from gemoe_cli.vlm import save_processor_files

    model.save_pretrained(directory)
    tiny_tokenizer(model_type).save_pretrained(directory)
    if has_processor(model_type):
        save_processor_files(processor(model_type), directory)
    return str(directory)


# --- Families ---------------------------------------------------------------------------------------------------


_QWEN_SPECIAL = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

# A Qwen-style vision tower for the default Qwen2VLImageProcessor settings: 14-pixel patches, 2 x 2 merged.
_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 32,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0],
}


def _qwen_text(**overrides: Any) -> dict[str, Any]:
    return {
        **_TEXT,
        "vocab_size": VOCAB_SIZE,
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        # The multimodal rotary embedding splits head_dim / 2 = 8 frequencies into time, height and width.
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **overrides,
    }


def _qwen3_vl_moe(ids: dict[str, int]):
    return CONFIG_MAPPING["qwen3_vl_moe"](
        text_config=_qwen_text(),
        vision_config=_QWEN_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


_OMNI_SPECIAL = {
    **_QWEN_SPECIAL,
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}


def _qwen3_omni_moe(ids: dict[str, int]):
    thinker = {
        "text_config": _qwen_text(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "interleaved": True,
            }
        ),
        "vision_config": {**_QWEN_VISION, "deepstack_visual_indexes": [0]},
        "audio_config": {
            "num_mel_bins": 16,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "d_model": 16,
            "output_dim": 32,
            "downsample_hidden_size": 8,
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "audio_token_id": ids["<|audio_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }
    # The talker (speech output) and its code-to-waveform decoder are left out: image+text in, text out.
    return CONFIG_MAPPING["qwen3_omni_moe"](thinker_config=thinker, enable_audio_output=False)


_GLM_SPECIAL = {"image_token": "<|image|>", "video_token": "<|video|>"}
_GLM_TEMPLATE = _chat_template(
    "<|{{ m.role }}|>\n", "", "<|begin_of_image|><|image|><|end_of_image|>", "<|assistant|>\n"
)


def _glm4v_moe(ids: dict[str, int]):
    text = {
        **_TEXT,
        "vocab_size": VOCAB_SIZE,
        "n_routed_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        },
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "image_size": 336,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 32,
    }
    return CONFIG_MAPPING["glm4v_moe"](
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )


_ERNIE_SPECIAL = {
    "image_token": "<|IMAGE_PLACEHOLDER|>",
    "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>",
    "video_end_token": "<|VIDEO_END|>",
}
_ERNIE_TEMPLATE = _chat_template(
    "{{ m.role | capitalize }}: ", "\n", "Picture:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", "Assistant: "
)


def _ernie4_5_vl_moe(ids: dict[str, int]):
    text = {
        **_TEXT,
        "vocab_size": VOCAB_SIZE,
        "moe_num_experts": NUM_EXPERTS,
        "moe_k": TOP_K,
        "moe_num_shared_experts": 1,
        "moe_intermediate_size": [32, 32],
        "mlp_layer_types": ["sparse", "sparse"],
        # The 3D rotary embedding splits head_dim / 2 = 4 frequencies into height, width and time sections.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_merge_size": 2,
    }
    return CONFIG_MAPPING["ernie4_5_vl_moe"](
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|IMAGE_PLACEHOLDER|>"],
        image_start_token_id=ids["<|IMAGE_START|>"],
        image_end_token_id=ids["<|IMAGE_END|>"],
        video_token_id=ids["<|VIDEO_PLACEHOLDER|>"],
        video_start_token_id=ids["<|VIDEO_START|>"],
        video_end_token_id=ids["<|VIDEO_END|>"],
    )


_ARIA_TEMPLATE = _chat_template(
    "<|im_start|>{{ m.role }}\n", "<|im_end|>\n", "<fim_prefix><|img|><fim_suffix>", "<|im_start|>assistant\n"
)


def _aria(ids: dict[str, int]):
    text = {
        **_TEXT,
        "vocab_size": VOCAB_SIZE,
        "moe_num_experts": NUM_EXPERTS,
        "moe_topk": TOP_K,
        "moe_num_shared_experts": 1,
    }
    # AriaImageProcessor's default max_image_size=980 gives 70 x 70 = 4900 patches of 14 pixels, which the
    # projector maps to 256 image tokens.
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 980,
        "patch_size": 14,
    }
    return CONFIG_MAPPING["aria"](text_config=text, vision_config=vision, image_token_index=ids["<|img|>"])


_LLAMA4_SPECIAL = {
    "image_token": "<|image|>",
    "patch_token": "<|patch|>",
    "boi_token": "<|image_start|>",
    "eoi_token": "<|image_end|>",
}
_LLAMA4_TEMPLATE = _chat_template(
    "<|header_start|>{{ m.role }}<|header_end|>\n\n",
    "<|eot|>",
    "<|image|>",
    "<|header_start|>assistant<|header_end|>\n\n",
)
LLAMA4_TILE = 336
LLAMA4_PATCH = 14


def _llama4(ids: dict[str, int]):
    text = {
        **_TEXT,
        "vocab_size": VOCAB_SIZE,
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": 2,
        "intermediate_size_mlp": 64,
        "moe_layers": [0, 1],
        "interleave_moe_layer_step": 1,
        "attention_chunk_size": 64,
    }
    # The pixel-shuffle MLP reads hidden_size / pixel_shuffle_ratio**2 = intermediate_size features per token.
    vision = {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": LLAMA4_TILE,
        "patch_size": LLAMA4_PATCH,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 32,
        "projector_output_dim": 32,
        "vision_output_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    return CONFIG_MAPPING["llama4"](
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<|patch|>"],
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
    )


_SPECS = [
    TinyVLM(
        "qwen3_vl_moe",
        _QWEN_SPECIAL,
        _qwen3_vl_moe,
        _QWEN_TEMPLATE,
        "Qwen3VLProcessor",
        "Qwen2VLImageProcessorPil",
        extra_tokens=("<|im_start|>",),
    ),
    TinyVLM(
        "qwen3_omni_moe",
        _OMNI_SPECIAL,
        _qwen3_omni_moe,
        _QWEN_TEMPLATE,
        "Qwen3OmniMoeProcessor",
        "Qwen2VLImageProcessorPil",
        extra_tokens=("<|im_start|>",),
    ),
    TinyVLM(
        "glm4v_moe",
        _GLM_SPECIAL,
        _glm4v_moe,
        _GLM_TEMPLATE,
        "Glm4vProcessor",
        "Glm4vImageProcessorPil",
        extra_tokens=(
            "<|user|>",
            "<|assistant|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
        ),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    ),
    TinyVLM(
        "ernie4_5_vl_moe",
        _ERNIE_SPECIAL,
        _ernie4_5_vl_moe,
        _ERNIE_TEMPLATE,
        "Ernie4_5_VLMoeProcessor",
        "Ernie4_5_VLMoeImageProcessorPil",
        eos_token="</s>",
        pad_token="<unk>",
    ),
    TinyVLM(
        "aria",
        {"image_token": "<|img|>"},
        _aria,
        _ARIA_TEMPLATE,
        "AriaProcessor",
        "AriaImageProcessorPil",
        extra_tokens=("<|im_start|>", "<fim_prefix>", "<fim_suffix>"),
        pad_token="<unk>",
    ),
    TinyVLM(
        "llama4",
        _LLAMA4_SPECIAL,
        _llama4,
        _LLAMA4_TEMPLATE,
        "Llama4Processor",
        "Llama4ImageProcessor",
        extra_tokens=("<|header_start|>", "<|header_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>"),
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad_id|>",
        requires_torchvision=True,
    ),
]

VLMS: dict[str, TinyVLM] = {spec.model_type: spec for spec in _SPECS}


def photo(name: str = "astronaut") -> np.ndarray:
    """Return one photograph of the built-in image set as an RGB uint8 array."""
    from gemoe_cli.calibration.images import builtin_image

    return np.asarray(builtin_image(name))


# Short questions and answers about built-in photographs, for tests that generate the answers.
PHOTO_QUESTIONS = (
    ("chelsea", "Which animal is this?", "A cat."),
    ("rocket", "What stands on the launch pad?", "A rocket."),
    ("coffee", "What is in the cup?", "Coffee."),
    ("astronaut", "Who is in the photo?", "An astronaut."),
    ("coins", "What lies on the table?", "Coins."),
)


def write_photo_dataset(directory, size: int = 224) -> str:
    """Write built-in photographs shrunk to `size` x `size` pixels and a JSONL file asking about them.

    Small images keep the image token count low (64 per image at 224 pixels for Qwen-style processors), so
    tests that run a model on many samples stay fast. Returns the path of the JSONL file.
    """
    import json
    from pathlib import Path

    from PIL import Image

    from gemoe_cli.calibration.images import builtin_image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, question, answer in PHOTO_QUESTIONS:
        builtin_image(name).resize((size, size), Image.BILINEAR).save(directory / f"{name}.png")
        lines.append(json.dumps({"image": f"{name}.png", "text": question, "answer": answer}))
    path = directory / "photos.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def llama4_inputs(messages: list[dict], image: np.ndarray, tiles: tuple[int, int] = (2, 2)) -> dict[str, torch.Tensor]:
    """Return llama4 model inputs for one conversation with one image, laid out as `Llama4Processor` does.

    The image is resized to ``tiles`` (rows, columns) of 336-pixel tiles plus one global tile, and normalised
    to [-1, 1] like `Llama4ImageProcessor`'s defaults. Its ``<|image|>`` placeholder in the rendered chat
    becomes the tile tokens: one ``<|patch|>`` per merged patch, separators between tiles, then the global tile.
    """
    from PIL import Image

    tokenizer = tiny_tokenizer("llama4")
    rows, columns = tiles
    side = LLAMA4_TILE
    patches_per_tile = (side // LLAMA4_PATCH) ** 2 // 4  # pixel shuffle with ratio 0.5 merges 2 x 2 patches
    picture = Image.fromarray(image).convert("RGB")
    canvas = np.asarray(picture.resize((columns * side, rows * side), Image.BILINEAR), dtype=np.float32)
    tiles_list = [
        canvas[row * side : (row + 1) * side, column * side : (column + 1) * side]
        for row in range(rows)
        for column in range(columns)
    ]
    tiles_list.append(np.asarray(picture.resize((side, side), Image.BILINEAR), dtype=np.float32))
    pixel_values = torch.from_numpy(np.stack(tiles_list)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (tiles, 3, H, W)

    placeholder = "<|image_start|>"
    for _ in range(rows):
        for column in range(columns):
            placeholder += "<|patch|>" * patches_per_tile
            if column < columns - 1:
                placeholder += "<|tile_x_separator|>"
        placeholder += "<|tile_y_separator|>"
    placeholder += "<|image|>" + "<|patch|>" * patches_per_tile + "<|image_end|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False).replace("<|image|>", placeholder, 1)
    input_ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
