"""Train and cache a small Qwen3-VL-MoE vision-language model with learned routing, for comparisons and tests.

Random routers route by noise, so whether image and text tokens want separate thresholds can only be measured on
a model whose routers were trained. No such vision-language model can be downloaded here, so this module trains
one offline, in the layout of `gemoe_cli.reference_model`:

- image+text samples: random crops, resizes and flips of the 18 scikit-image photographs of the built-in image
  set, each with a caption written for this model (`data/reference_vlm_captions.jsonl`) as the answer to a
  prompt from `TRAINING_PROMPTS`. The last caption of each photograph is held out. `evaluation_samples` pairs
  the held-out (or the training) captions with fresh crops, and `write_evaluation_set` saves them as an
  image+text JSONL dataset;
- text-only samples: windows of the training part of the text reference model's corpus (CPython's reference
  manual topics and standard library docstrings), with the same held-out split.

Both kinds of sample share every training step, so image tokens and text tokens both shape the routers. The
result lives in a cache directory whose name contains a hash of everything that determines the weights.

The steps are functions that work on their own: `load_image_text_corpus`, `train_vlm_tokenizer`,
`build_processor`, `build_vlm`, `augment_photo`, `evaluation_samples`, `train_vlm`, `evaluate_vlm`.
`ensure_reference_vlm` runs them once per cache key. From the shell: `python -m gemoe_cli.reference_vlm --help`.

Legend for shape comments: B rows of a batch, L tokens per row, V vocabulary, E experts, P image patches.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemoe_cli import reference_model
from gemoe_cli.reference_model import EXPERTS_IMPLEMENTATIONS, Corpus, CorpusSplit

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, Qwen3VLMoeForConditionalGeneration

    from gemoe_cli.calibration.multimodal import MultimodalBatch

# Bump when a code change alters the trained weights or the contents of training.json, so old caches are not reused.
TRAINER_VERSION = 1

MODEL_DIR_PREFIX = "qwen3-vl-moe-reference-"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "training.json",
)
CAPTIONS_FILE = "data/reference_vlm_captions.jsonl"
# Licences as the docstrings of the `skimage.data` functions (scikit-image 0.26) state them.
IMAGE_LICENSE = (
    "public domain, CC0 or no known copyright restrictions, except moon, page and stereo_motorcycle (the Middlebury "
    "2014 stereo benchmark), whose skimage.data docstrings state no licence"
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)

# Qwen's chat layout: `<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n`. The
# processor repeats `<|image_pad|>` once per image feature. Message content is a string or a list of items.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# User turns of the image+text training samples. None of them is a question of the built-in image set.
TRAINING_PROMPTS = (
    "Describe this image.",
    "What do you see in this photo?",
    "Write a caption for this picture.",
    "Give a short description of this photo.",
    "What is shown here?",
    "Caption this image in one sentence.",
)


@dataclasses.dataclass(frozen=True)
class ReferenceVLMSettings:
    """Hyper-parameters of the tokenizer, model, image processor and training run.

    With the training data and the library versions they determine the trained weights, so all of them enter the
    cache key. The defaults give a model of about 4.1M parameters.
    """

    seed: int = 0
    # Text corpus split, as in `ReferenceModelSettings`. With the same values, both models hold out the same text.
    chunk_chars: int = 2000
    heldout_every: int = 20
    # Byte-level BPE vocabulary, special tokens included.
    vocab_size: int = 2048
    # Text decoder (Qwen3VLMoeTextConfig). Every layer is an MoE layer. `moe_intermediate_size` is the hidden size
    # of each expert's MLP, and the head size is hidden_size / num_attention_heads.
    hidden_size: int = 128
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 4
    max_position_embeddings: int = 512
    router_aux_loss_coef: float = 0.01
    # Vision tower (Qwen3VLMoeVisionConfig). Patches of `patch_size` pixels are merged 2 x 2 into one image token.
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 2
    patch_size: int = 16
    # The image processor scales every image so that its area is within [min_pixels, max_pixels] and its sides are
    # multiples of 2 * patch_size. 256 x 256 pixels become 64 image tokens.
    min_pixels: int = 64 * 64
    max_pixels: int = 256 * 256
    # Augmentation: a crop of a random share of the photo's area in [min_crop_area, 1] and a random aspect ratio
    # within [1 / max_crop_aspect_ratio, max_crop_aspect_ratio], flipped left to right with probability 1/2, then
    # scaled to a random area in [min_train_pixels, max_pixels].
    min_crop_area: float = 0.3
    max_crop_aspect_ratio: float = 4 / 3
    min_train_pixels: int = 96 * 96
    # The last `heldout_captions_per_photo` captions of each photograph are never trained on, not even by the
    # tokenizer. The held-out set pairs each with `heldout_crops_per_caption` crops, drawn with seed + 2.
    heldout_captions_per_photo: int = 1
    heldout_crops_per_caption: int = 3
    # Training: each step has `image_batch_size` image+text samples and `text_batch_size` text windows of
    # `text_seq_len` tokens. AdamW, linear warm-up, then cosine decay to `min_learning_rate_ratio * learning_rate`.
    image_batch_size: int = 8
    text_batch_size: int = 8
    text_seq_len: int = 128
    steps: int = 1000
    learning_rate: float = 3e-3
    min_learning_rate_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    experts_implementation: str = "grouped_mm"
    deterministic_algorithms: bool = True
    # Evaluation during training (for the record only) and its batch size for text windows.
    heldout_eval_every: int = 250
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive = (
            "chunk_chars",
            "vocab_size",
            "hidden_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_experts",
            "num_experts_per_tok",
            "vision_depth",
            "vision_hidden_size",
            "vision_intermediate_size",
            "vision_num_heads",
            "patch_size",
            "min_pixels",
            "heldout_crops_per_caption",
            "text_seq_len",
            "steps",
            "heldout_eval_every",
            "eval_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.image_batch_size < 1 and self.text_batch_size < 1:
            problems.append("image_batch_size and text_batch_size are both 0; at least one must be positive")
        if min(self.image_batch_size, self.text_batch_size) < 0:
            problems.append("image_batch_size and text_batch_size must not be negative")
        if self.heldout_captions_per_photo < 0:
            problems.append(f"heldout_captions_per_photo={self.heldout_captions_per_photo} must not be negative")
        if self.heldout_every < 2:
            problems.append(f"heldout_every={self.heldout_every} must be at least 2 so that some text is trained on")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            problems.append(f"vocab_size={self.vocab_size} must hold the 256 byte tokens and the special tokens")
        if self.num_experts_per_tok > self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")
        head_dim, remainder = divmod(self.hidden_size, max(self.num_attention_heads, 1))
        if remainder or head_dim % 2 or head_dim < 6:
            problems.append(
                f"hidden_size={self.hidden_size} / num_attention_heads={self.num_attention_heads} must be an even "
                "head size of at least 6, which the multimodal rotary embedding splits into 3 sections"
            )
        if self.vision_hidden_size % max(self.vision_num_heads, 1):
            problems.append(
                f"vision_hidden_size={self.vision_hidden_size} is not a multiple of "
                f"vision_num_heads={self.vision_num_heads}"
            )
        if not self.min_pixels <= self.min_train_pixels <= self.max_pixels:
            problems.append(
                f"min_train_pixels={self.min_train_pixels} must be in [min_pixels={self.min_pixels}, "
                f"max_pixels={self.max_pixels}]"
            )
        if self.max_pixels < (2 * self.patch_size) ** 2:
            problems.append(f"max_pixels={self.max_pixels} is below one image token of {2 * self.patch_size} pixels")
        if self.text_seq_len > self.max_position_embeddings:
            problems.append(
                f"text_seq_len={self.text_seq_len} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        if not 0 < self.min_crop_area <= 1:
            problems.append(f"min_crop_area={self.min_crop_area} must be in (0, 1]")
        if self.max_crop_aspect_ratio < 1:
            problems.append(f"max_crop_aspect_ratio={self.max_crop_aspect_ratio} must be at least 1")
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate} must be positive")
        if not 0 <= self.min_learning_rate_ratio <= 1:
            problems.append(f"min_learning_rate_ratio={self.min_learning_rate_ratio} must be in [0, 1]")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            problems.append(
                f"experts_implementation={self.experts_implementation!r} is not one of "
                f"{', '.join(EXPERTS_IMPLEMENTATIONS)}"
            )
        if problems:
            raise ValueError("invalid reference VLM settings: " + "; ".join(problems))


# --- Training data ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhotoCaptions:
    """One photograph of the built-in image set (a name `builtin_image` accepts) and captions of it."""

    photo: str
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ImageTextCorpus:
    """The training and held-out captions of each photograph, the prompts, and the text corpus with its split."""

    photos: tuple[PhotoCaptions, ...]
    heldout: tuple[PhotoCaptions, ...]
    prompts: tuple[str, ...]
    text: Corpus
    split: CorpusSplit

    def sha256(self) -> str:
        """Hash the photographs' pixels, the captions, the prompts and the text corpus."""
        import numpy as np

        from gemoe_cli.calibration.images import builtin_image

        digest = hashlib.sha256(self.text.sha256().encode())
        for entry in self.photos:
            pixels = np.ascontiguousarray(np.asarray(builtin_image(entry.photo)))
            digest.update(f"{entry.photo}:{pixels.shape}".encode() + b"\0" + pixels.tobytes())
            for caption in entry.captions:
                digest.update(caption.encode() + b"\0")
        for entry in self.heldout:
            digest.update(f"heldout:{entry.photo}".encode() + b"\0")
            for caption in entry.captions:
                digest.update(caption.encode() + b"\0")
        for prompt in self.prompts:
            digest.update(prompt.encode() + b"\0")
        return digest.hexdigest()

    def tokenizer_texts(self) -> list[str]:
        """Return the texts the tokenizer trains on: the training text segments, training captions and prompts."""
        captions = [caption for entry in self.photos for caption in entry.captions]
        return [*self.split.train_segments, *captions, *self.prompts]


def load_photo_captions() -> tuple[PhotoCaptions, ...]:
    """Read the captions of `CAPTIONS_FILE`, one photograph per line, in file order.

    Raises:
        ValueError: a line is not a photograph name with a non-empty list of captions.
    """
    text = resources.files("gemoe_cli").joinpath(CAPTIONS_FILE).read_text(encoding="utf-8")
    photos = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        captions = record.get("captions")
        valid = isinstance(record.get("photo"), str) and isinstance(captions, list) and captions
        if not valid or not all(isinstance(caption, str) and caption for caption in captions):
            raise ValueError(f"{CAPTIONS_FILE} line {number}: expected a 'photo' name and a list of 'captions'")
        photos.append(PhotoCaptions(record["photo"], tuple(captions)))
    return tuple(photos)


def load_image_text_corpus(settings: ReferenceVLMSettings) -> ImageTextCorpus:
    """Collect the captioned photographs and the text corpus, split as `reference_model.split_corpus` does.

    Raises:
        ValueError: a photograph has no caption left to train on after the held-out ones.
    """
    heldout_count = settings.heldout_captions_per_photo
    train, heldout = [], []
    for entry in load_photo_captions():
        if len(entry.captions) <= heldout_count:
            raise ValueError(
                f"photograph {entry.photo} has {len(entry.captions)} captions, so holding out "
                f"heldout_captions_per_photo={heldout_count} leaves none to train on; lower the setting or add captions"
            )
        train.append(PhotoCaptions(entry.photo, entry.captions[: len(entry.captions) - heldout_count]))
        if heldout_count:
            heldout.append(PhotoCaptions(entry.photo, entry.captions[len(entry.captions) - heldout_count :]))
    text = reference_model.load_corpus()
    split = reference_model.split_corpus(text, settings)
    return ImageTextCorpus(tuple(train), tuple(heldout), TRAINING_PROMPTS, text, split)


# --- Tokenizer, processor and model ----------------------------------------------------------------------------


def train_vlm_tokenizer(texts: Sequence[str], settings: ReferenceVLMSettings) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen's special tokens and `CHAT_TEMPLATE`.

    Encoding adds no special token. `<|im_end|>` ends chat turns and documents, and `<|endoftext|>` pads.
    """
    from transformers import PreTrainedTokenizerFast

    backend = reference_model.train_byte_level_bpe(texts, settings.vocab_size, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
            "vision_start_token": VISION_START_TOKEN,
            "vision_end_token": VISION_END_TOKEN,
        },
        model_max_length=settings.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, settings: ReferenceVLMSettings):
    """Assemble a `Qwen3VLProcessor` for images and text, without a video processor.

    transformers 5.23 makes every video processor require torchvision, so this processor handles no videos.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    from gemoe_cli.vlm import image_only_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=settings.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
    )
    return image_only_processor(Qwen3VLProcessor, image_processor, tokenizer, CHAT_TEMPLATE)


def mrope_sections(head_dim: int) -> list[int]:
    """Split the head_dim / 2 rotary frequencies into time, height and width sections, the first the largest."""
    half = head_dim // 2
    base = half // 3
    return [half - 2 * base, base, base]


def build_vlm(settings: ReferenceVLMSettings, tokenizer: PreTrainedTokenizerFast) -> Qwen3VLMoeForConditionalGeneration:
    """Build the untrained model, with weights drawn from torch's default generator (seed it first)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    head_dim = settings.hidden_size // settings.num_attention_heads
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": settings.hidden_size,
        # Used only by dense MLP layers, and every layer here is an MoE layer.
        "intermediate_size": 2 * settings.hidden_size,
        "moe_intermediate_size": settings.moe_intermediate_size,
        "num_hidden_layers": settings.num_hidden_layers,
        "num_attention_heads": settings.num_attention_heads,
        "num_key_value_heads": settings.num_attention_heads,
        "head_dim": head_dim,
        "max_position_embeddings": settings.max_position_embeddings,
        "num_experts": settings.num_experts,
        "num_experts_per_tok": settings.num_experts_per_tok,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": settings.router_aux_loss_coef,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_sections(head_dim)},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    # The learned position embeddings of the vision tower cover the largest image side in patches and are
    # interpolated for smaller images.
    side = math.isqrt(settings.max_pixels) // settings.patch_size
    vision_config = {
        "depth": settings.vision_depth,
        "hidden_size": settings.vision_hidden_size,
        "intermediate_size": settings.vision_intermediate_size,
        "num_heads": settings.vision_num_heads,
        "patch_size": settings.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": settings.hidden_size,
        "num_position_embeddings": side * side,
        "deepstack_visual_indexes": [0],
    }
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[VISION_START_TOKEN],
        vision_end_token_id=ids[VISION_END_TOKEN],
        tie_word_embeddings=True,
    )
    config.text_config.experts_implementation = settings.experts_implementation
    return Qwen3VLMoeForConditionalGeneration(config)


# --- Augmentation and batches ----------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    import torch

    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """Return a random integer in [0, high)."""
    import torch

    return int(torch.randint(high, (), generator=generator).item())


def augment_photo(photo: Image.Image, settings: ReferenceVLMSettings, generator: torch.Generator) -> Image.Image:
    """Return a random crop of `photo`, flipped left to right half of the time and scaled to a random size.

    The crop covers a random share of the area in [min_crop_area, 1] with a random aspect ratio, and falls back to
    the whole photo when ten draws do not fit. The output's sides are multiples of 2 * patch_size, and its area is
    at most max_pixels and close to a random target in [min_train_pixels, max_pixels]. The image processor keeps
    that size unless the area is below its min_pixels.
    """
    from PIL import Image

    width, height = photo.size
    crop_width, crop_height = width, height
    for _ in range(10):
        area = width * height * _uniform(generator, settings.min_crop_area, 1.0)
        log_ratio = math.log(settings.max_crop_aspect_ratio)
        ratio = math.exp(_uniform(generator, -log_ratio, log_ratio))
        candidate_width = round(math.sqrt(area * ratio))
        candidate_height = round(math.sqrt(area / ratio))
        if 0 < candidate_width <= width and 0 < candidate_height <= height:
            crop_width, crop_height = candidate_width, candidate_height
            break
    left = _randint(generator, width - crop_width + 1)
    top = _randint(generator, height - crop_height + 1)
    crop = photo.crop((left, top, left + crop_width, top + crop_height))
    if _uniform(generator, 0.0, 1.0) < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    factor = 2 * settings.patch_size
    target_area = _uniform(generator, settings.min_train_pixels, settings.max_pixels)
    aspect = crop_width / crop_height
    out_width = max(factor, round(math.sqrt(target_area * aspect) / factor) * factor)
    out_height = max(factor, round(math.sqrt(target_area / aspect) / factor) * factor)
    while out_width * out_height > settings.max_pixels:
        if out_width >= out_height:
            out_width -= factor
        else:
            out_height -= factor
    return crop.resize((out_width, out_height), Image.Resampling.BICUBIC)


def encode_image_text(processor, image: Image.Image, prompt: str, caption: str) -> dict[str, torch.Tensor]:
    """Render a user turn with the image and `prompt` and an assistant turn with `caption`, and process it.

    Returns the processor's tensors for one row: `input_ids` and `mm_token_type_ids` (1, L), `pixel_values`
    (P, 3 * 2 * patch_size**2) and `image_grid_thw` (1, 3).
    """
    from gemoe_cli.calibration.images import chat_messages
    from gemoe_cli.calibration.multimodal import render_chat

    text = render_chat(processor, chat_messages(prompt, 1, caption), add_generation_prompt=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    return {name: encoded[name] for name in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")}


def collate(rows: Sequence[dict[str, torch.Tensor]], pad_token_id: int, image_token_id: int):
    """Pad rows (dicts with `input_ids` (1, L) and optional image tensors) on the right into one batch.

    Returns the model's keyword arguments and the labels (B, L), which are -100 on padding and image tokens.
    """
    import torch

    length = max(row["input_ids"].size(1) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
    token_types = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
    for index, row in enumerate(rows):
        row_length = row["input_ids"].size(1)
        input_ids[index, :row_length] = row["input_ids"][0]
        attention_mask[index, :row_length] = 1
        if "mm_token_type_ids" in row:
            token_types[index, :row_length] = row["mm_token_type_ids"][0]
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == image_token_id), -100)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": token_types,
    }
    image_rows = [row for row in rows if "pixel_values" in row]
    if image_rows:
        inputs["pixel_values"] = torch.cat([row["pixel_values"] for row in image_rows])  # (P, ...)
        inputs["image_grid_thw"] = torch.cat([row["image_grid_thw"] for row in image_rows])  # (images, 3)
    return inputs, labels


class BatchSampler:
    """Sampler of training batches, which mix augmented captioned photographs and windows of the text stream."""

    def __init__(
        self,
        corpus: ImageTextCorpus,
        processor,
        text_tokens: torch.Tensor,
        settings: ReferenceVLMSettings,
        generator: torch.Generator,
    ) -> None:
        from gemoe_cli.calibration.images import builtin_image

        self.corpus = corpus
        self.processor = processor
        self.text_tokens = text_tokens
        self.settings = settings
        self.generator = generator
        self.photos = [builtin_image(entry.photo) for entry in corpus.photos]
        self.max_start = text_tokens.numel() - settings.text_seq_len
        if settings.text_batch_size and self.max_start < 1:
            raise ValueError(
                f"the training text has {text_tokens.numel()} tokens, fewer than text_seq_len + 1 = "
                f"{settings.text_seq_len + 1}. Lower text_seq_len."
            )

    def draw(self):
        """Return the next batch: model keyword arguments and labels (B, L)."""
        tokenizer = self.processor.tokenizer
        rows = []
        for _ in range(self.settings.image_batch_size):
            index = _randint(self.generator, len(self.photos))
            entry = self.corpus.photos[index]
            caption = entry.captions[_randint(self.generator, len(entry.captions))]
            prompt = self.corpus.prompts[_randint(self.generator, len(self.corpus.prompts))]
            image = augment_photo(self.photos[index], self.settings, self.generator)
            rows.append(encode_image_text(self.processor, image, prompt, caption))
        for _ in range(self.settings.text_batch_size):
            start = _randint(self.generator, self.max_start)
            rows.append({"input_ids": self.text_tokens[start : start + self.settings.text_seq_len].unsqueeze(0)})
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return collate(rows, tokenizer.pad_token_id, image_token_id)


# --- Evaluation sets -------------------------------------------------------------------------------------------

CAPTION_SPLITS = ("heldout", "trained")


@dataclasses.dataclass(frozen=True)
class EvaluationSample:
    """One image+text sample for evaluation: a fresh crop of a photograph, a prompt and a caption."""

    name: str
    image: Image.Image
    prompt: str
    caption: str


def evaluation_samples(
    corpus: ImageTextCorpus,
    settings: ReferenceVLMSettings,
    captions: str = "heldout",
    crops_per_caption: int | None = None,
) -> list[EvaluationSample]:
    """Pair every held-out or every training caption with `crops_per_caption` crops made by `augment_photo`.

    `captions` is "heldout" (the captions training left out) or "trained". `crops_per_caption` defaults to
    `settings.heldout_crops_per_caption`. The crops are drawn with a generator seeded with seed + 2, which
    training never uses, so they are new views of the training photographs. The prompts cycle through
    `TRAINING_PROMPTS`, which training does use.

    Raises:
        ValueError: `captions` is not one of `CAPTION_SPLITS`, or `crops_per_caption` is below 1.
    """
    import torch

    from gemoe_cli.calibration.images import builtin_image

    if captions not in CAPTION_SPLITS:
        raise ValueError(f"captions={captions!r} is not one of {', '.join(CAPTION_SPLITS)}")
    crops = settings.heldout_crops_per_caption if crops_per_caption is None else crops_per_caption
    if crops < 1:
        raise ValueError(f"crops_per_caption={crops} must be at least 1")
    generator = torch.Generator().manual_seed(settings.seed + 2)
    samples = []
    for entry in corpus.heldout if captions == "heldout" else corpus.photos:
        photo = builtin_image(entry.photo)
        for caption_index, caption in enumerate(entry.captions):
            for crop in range(crops):
                prompt = corpus.prompts[len(samples) % len(corpus.prompts)]
                image = augment_photo(photo, settings, generator)
                name = f"{entry.photo}-{captions}{caption_index}-{crop}"
                samples.append(EvaluationSample(name, image, prompt, caption))
    return samples


def heldout_samples(corpus: ImageTextCorpus, settings: ReferenceVLMSettings) -> list[EvaluationSample]:
    """Return the held-out set: each held-out caption with `heldout_crops_per_caption` fresh crops."""
    return evaluation_samples(corpus, settings, "heldout")


def write_evaluation_set(
    directory: Path,
    settings: ReferenceVLMSettings | None = None,
    *,
    captions: str = "heldout",
    crops_per_caption: int | None = None,
    force: bool = False,
) -> Path:
    """Write `evaluation_samples` as PNG files and `samples.jsonl`, the JSONL format `gemoe calibrate` reads.

    Returns the path of `samples.jsonl`. The directory appears complete or not at all.

    Raises:
        InvalidInputError: `directory` exists without `force`, or cannot be written.
        ValueError: `captions` or `crops_per_caption` is invalid.
    """
    from gemoe_cli.atomic import atomic_directory

    settings = settings or ReferenceVLMSettings()
    with atomic_directory(Path(directory), force=force, what="evaluation set") as temporary:
        corpus = load_image_text_corpus(settings)
        lines = []
        for sample in evaluation_samples(corpus, settings, captions, crops_per_caption):
            sample.image.save(temporary / f"{sample.name}.png")
            record = {"id": sample.name, "image": f"{sample.name}.png", "text": sample.prompt, "answer": sample.caption}
            lines.append(json.dumps(record))
        (temporary / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(directory) / "samples.jsonl"


# --- Training --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLMTrainingResult:
    """Losses of a training run.

    `final_train_loss` and `final_aux_loss` are means over the last 50 steps. `loss_curve` contains (step, mean
    language-model loss of the last 100 steps), and `eval_curve` contains (step, `VLMEvaluation.summary()`).
    `wall_time_s` excludes the evaluations, which took `eval_time_s`.
    """

    final_train_loss: float
    final_aux_loss: float
    loss_curve: tuple[tuple[int, float], ...]
    eval_curve: tuple[tuple[int, dict[str, float]], ...]
    wall_time_s: float
    eval_time_s: float
    tokens_seen: int


def train_vlm(
    model: Qwen3VLMoeForConditionalGeneration,
    sampler: BatchSampler,
    settings: ReferenceVLMSettings,
    *,
    evaluation_data: EvaluationData | None = None,
    progress: bool = True,
) -> VLMTrainingResult:
    """Train `model` in place on batches from `sampler`.

    The loss is the next-token cross-entropy on text tokens plus `router_aux_loss_coef` times the load-balancing
    loss of each MoE layer, averaged over layers, with padding left out. With `evaluation_data`, the model is
    evaluated every `heldout_eval_every` steps. The evaluation draws no random numbers, so the trained weights
    are the same with or without it.
    """
    import torch

    decay, no_decay = [], []
    for parameter in model.parameters():
        # Norm weights and biases (1-D) are not decayed. Embedding, router, expert and vision weights decay.
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
    )

    model.train()
    lm_losses: list[float] = []
    aux_losses: list[float] = []
    loss_curve: list[tuple[int, float]] = []
    eval_curve: list[tuple[int, dict[str, float]]] = []
    tokens_seen = 0
    eval_time = 0.0
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = reference_model.learning_rate_at(step, settings)
        inputs, labels = sampler.draw()
        tokens_seen += int(inputs["attention_mask"].sum())
        lm_loss, aux_loss = _training_step(model, optimizer, inputs, labels, settings)
        lm_losses.append(lm_loss)
        aux_losses.append(aux_loss)

        done = step + 1
        if done % 100 == 0 or done == settings.steps:
            recent = statistics.fmean(lm_losses[-100:])
            loss_curve.append((done, round(recent, 4)))
            elapsed = time.perf_counter() - started - eval_time
            reference_model.report_progress(
                progress,
                f"step {done}/{settings.steps}: loss {recent:.3f}, aux loss {aux_losses[-1]:.3f}, "
                f"lr {reference_model.learning_rate_at(step, settings):.2e}, {elapsed:.0f} s",
            )
        if evaluation_data is not None and (done % settings.heldout_eval_every == 0 or done == settings.steps):
            eval_started = time.perf_counter()
            summary = evaluate_vlm(model, evaluation_data, settings.eval_batch_size).summary()
            model.train()
            eval_time += time.perf_counter() - eval_started
            eval_curve.append((done, summary))
            reference_model.report_progress(
                progress, f"step {done}: " + ", ".join(f"{k} {v}" for k, v in summary.items())
            )
    model.eval()
    return VLMTrainingResult(
        final_train_loss=statistics.fmean(lm_losses[-50:]),
        final_aux_loss=statistics.fmean(aux_losses[-50:]),
        loss_curve=tuple(loss_curve),
        eval_curve=tuple(eval_curve),
        wall_time_s=time.perf_counter() - started - eval_time,
        eval_time_s=eval_time,
        tokens_seen=tokens_seen,
    )


def _training_step(
    model: Qwen3VLMoeForConditionalGeneration,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    settings: ReferenceVLMSettings,
) -> tuple[float, float]:
    """Run one optimiser step and return the language-model and load-balancing losses."""
    import torch

    output = model(**inputs, output_router_logits=True, use_cache=False)
    vocab = output.logits.shape[-1]
    predictions = output.logits[:, :-1].reshape(-1, vocab).float()  # (B * (L - 1), V)
    lm_loss = torch.nn.functional.cross_entropy(predictions, labels[:, 1:].reshape(-1), ignore_index=-100)
    aux_loss = reference_model.load_balancing_loss(
        output.router_logits, settings.num_experts, settings.num_experts_per_tok, inputs["attention_mask"]
    )
    loss = lm_loss + settings.router_aux_loss_coef * aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    return lm_loss.item(), aux_loss.item()


# --- Evaluation ------------------------------------------------------------------------------------------------

# Token groups of the evaluation: image tokens and text tokens of the image+text samples, and held-out text.
TOKEN_GROUPS = ("image", "text", "heldout_text")


@dataclasses.dataclass(frozen=True)
class EvaluationData:
    """Inputs of `evaluate_vlm`: image+text samples (one per batch) and held-out text windows (N, L).

    `image_text` is the built-in image set and `heldout_captions` the held-out set of `heldout_samples`.
    """

    image_text: tuple[MultimodalBatch, ...]
    heldout_captions: tuple[MultimodalBatch, ...]
    text_windows: torch.Tensor
    image_token_id: int


@dataclasses.dataclass(frozen=True)
class VLMEvaluation:
    """Quality and routing statistics of one model, by token group (`TOKEN_GROUPS`).

    `answer_loss` is the mean next-token loss on the reference answers of the built-in image set, `heldout_caption_loss`
    that on the captions of the held-out set, and `heldout_text_loss` that on the held-out text windows.
    Normalised gating entropy is `H(softmax(router logits)) / log(E)`: 0 for a one-hot gate, 1 for a uniform one.
    `expert_load` contains, per group and MoE layer, the fraction of top-k
    slots that went to each expert (1/E when balanced).
    """

    answer_loss: float
    answer_tokens: int
    heldout_caption_loss: float
    heldout_caption_tokens: int
    heldout_text_loss: float
    heldout_text_tokens: int
    tokens: dict[str, int]
    mean_normalized_entropy: dict[str, float]
    normalized_entropy_per_layer: dict[str, tuple[float, ...]]
    normalized_entropy_quantiles: dict[str, dict[str, float]]
    expert_load: dict[str, tuple[tuple[float, ...], ...]]

    def summary(self) -> dict[str, float]:
        """Return the headline numbers, rounded, for progress lines and the training curve."""
        return {
            "answer_loss": round(self.answer_loss, 4),
            "heldout_caption_loss": round(self.heldout_caption_loss, 4),
            "heldout_text_loss": round(self.heldout_text_loss, 4),
            **{f"entropy_{group}": round(value, 4) for group, value in self.mean_normalized_entropy.items()},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "answer_loss": round(self.answer_loss, 4),
            "answer_tokens": self.answer_tokens,
            "heldout_caption_loss": round(self.heldout_caption_loss, 4),
            "heldout_caption_tokens": self.heldout_caption_tokens,
            "heldout_text_loss": round(self.heldout_text_loss, 4),
            "heldout_text_perplexity": round(math.exp(self.heldout_text_loss), 2),
            "heldout_text_tokens": self.heldout_text_tokens,
            "tokens": self.tokens,
            "mean_normalized_entropy": {
                group: round(value, 4) for group, value in self.mean_normalized_entropy.items()
            },
            "normalized_entropy_per_layer": {
                group: [round(value, 4) for value in values]
                for group, values in self.normalized_entropy_per_layer.items()
            },
            "normalized_entropy_quantiles": {
                group: {name: round(value, 4) for name, value in quantiles.items()}
                for group, quantiles in self.normalized_entropy_quantiles.items()
            },
            "expert_load": {
                group: [[round(value, 4) for value in layer] for layer in layers]
                for group, layers in self.expert_load.items()
            },
        }


def load_evaluation_data(processor, corpus: ImageTextCorpus, settings: ReferenceVLMSettings, config) -> EvaluationData:
    """Encode the built-in image set and the held-out set as calibration does, and cut the held-out text.

    The built-in image set shows the training photographs, whole, with questions and answers that were never
    trained on. The held-out set shows new crops of them with held-out captions. The held-out text is the part
    of the corpus that training leaves out.
    """
    from gemoe_cli.calibration.images import (
        BUILTIN_IMAGES,
        ImageSource,
        ImageTextSample,
        chat_messages,
        read_image_text_samples,
    )
    from gemoe_cli.calibration.multimodal import encode_sample

    placeholders = {config.image_token_id, config.video_token_id}

    def encode(sample: ImageTextSample) -> MultimodalBatch:
        return encode_sample(
            sample, processor, placeholders, max_images=None, max_tokens=settings.max_position_embeddings
        )

    builtin = tuple(encode(sample) for sample in read_image_text_samples(BUILTIN_IMAGES))
    heldout = tuple(
        encode(ImageTextSample(chat_messages(sample.prompt, 1, sample.caption), [ImageSource(decoded=sample.image)]))
        for sample in heldout_samples(corpus, settings)
    )
    windows = reference_model.heldout_windows(processor.tokenizer, corpus.split.heldout_text, settings.text_seq_len)
    return EvaluationData(builtin, heldout, windows, config.image_token_id)


class _RoutingStatistics:
    """Normalised gating entropy and top-k expert counts, collected by token group and MoE layer."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.entropies: dict[str, list[list[torch.Tensor]]] = {group: [] for group in TOKEN_GROUPS}
        self.load_counts: dict[str, list[torch.Tensor]] = {group: [] for group in TOKEN_GROUPS}

    def add(self, router_logits: Sequence[torch.Tensor], group_masks: dict[str, torch.Tensor]) -> None:
        """Add one forward pass: router logits (B * L, E) per layer, and a (B * L,) bool mask per group."""
        import torch

        from gemoe_cli.routing.gating import gating_entropy

        for layer, logits in enumerate(router_logits):
            normalized = gating_entropy(torch.softmax(logits.float(), dim=-1)) / math.log(self.num_experts)
            chosen = logits.topk(self.top_k, dim=-1).indices  # (B * L, K)
            for group, mask in group_masks.items():
                if layer == len(self.entropies[group]):
                    self.entropies[group].append([])
                    self.load_counts[group].append(torch.zeros(self.num_experts, dtype=torch.float64))
                self.entropies[group][layer].append(normalized[mask])
                counts = torch.bincount(chosen[mask].reshape(-1), minlength=self.num_experts)
                self.load_counts[group][layer] += counts.double()


def evaluate_vlm(model: Qwen3VLMoeForConditionalGeneration, data: EvaluationData, batch_size: int) -> VLMEvaluation:
    """Measure answer, caption and held-out text loss, and gating entropy by token group, without gradients.

    The entropy groups are the image and text tokens of the built-in image set and the held-out text windows.
    """
    import torch

    text_config = model.config.get_text_config()
    routing = _RoutingStatistics(text_config.num_experts, text_config.num_experts_per_tok)
    losses = {"answer": [0.0, 0], "heldout_caption": [0.0, 0], "heldout_text": [0.0, 0]}  # loss sum, tokens
    model.eval()
    with torch.no_grad():
        for part, batches in (("answer", data.image_text), ("heldout_caption", data.heldout_captions)):
            for batch in batches:
                output = model(**batch.inputs, output_router_logits=True, use_cache=False)
                input_ids = batch.inputs["input_ids"]  # (1, L)
                _add_loss(losses[part], output.logits, input_ids, batch.target_mask)
                if part == "answer":
                    is_image = (input_ids == data.image_token_id).reshape(-1)  # (L,)
                    routing.add(output.router_logits, {"image": is_image, "text": ~is_image})

        # An empty (0, L) tensor still splits into one empty chunk, which the model cannot run.
        for windows in data.text_windows.split(batch_size) if data.text_windows.numel() else ():
            output = model(input_ids=windows, output_router_logits=True, use_cache=False)
            _add_loss(losses["heldout_text"], output.logits, windows, torch.ones_like(windows, dtype=torch.bool))
            routing.add(output.router_logits, {"heldout_text": torch.ones(windows.numel(), dtype=torch.bool)})
    return _evaluation(routing, losses)


def _add_loss(total: list, logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> None:
    """Add the next-token loss of the tokens in `target_mask` (B, L) to `total` (loss sum, token count)."""
    import torch

    targets = target_mask[:, 1:]  # (B, L - 1): the first token is never predicted
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
    )  # (B, L - 1)
    total[0] += per_token[targets].sum().item()
    total[1] += int(targets.sum())


def _evaluation(routing: _RoutingStatistics, losses: dict[str, list]) -> VLMEvaluation:
    import torch

    means: dict[str, float] = {}
    per_layer: dict[str, tuple[float, ...]] = {}
    quantiles: dict[str, dict[str, float]] = {}
    loads: dict[str, tuple[tuple[float, ...], ...]] = {}
    counts: dict[str, int] = {}
    probabilities = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for group, layers in routing.entropies.items():
        values = [torch.cat(chunks).double() for chunks in layers]
        if not values or values[0].numel() == 0:
            continue
        pooled = torch.cat(values)
        counts[group] = values[0].numel()
        means[group] = pooled.mean().item()
        per_layer[group] = tuple(layer.mean().item() for layer in values)
        low, middle, high = torch.quantile(pooled, probabilities).tolist()
        quantiles[group] = {"p10": low, "p50": middle, "p90": high}
        loads[group] = tuple(tuple((load / load.sum()).tolist()) for load in routing.load_counts[group])

    def mean_loss(part: str) -> float:
        loss_sum, tokens = losses[part]
        return loss_sum / tokens if tokens else math.nan

    return VLMEvaluation(
        answer_loss=mean_loss("answer"),
        answer_tokens=losses["answer"][1],
        heldout_caption_loss=mean_loss("heldout_caption"),
        heldout_caption_tokens=losses["heldout_caption"][1],
        heldout_text_loss=mean_loss("heldout_text"),
        heldout_text_tokens=losses["heldout_text"][1],
        tokens=counts,
        mean_normalized_entropy=means,
        normalized_entropy_per_layer=per_layer,
        normalized_entropy_quantiles=quantiles,
        expert_load=loads,
    )


# --- Cache -----------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Return the versions of the text model's libraries plus Pillow, scikit-image and numpy."""
    versions = reference_model.library_versions()
    for package in ("pillow", "scikit-image", "numpy"):
        versions[package] = importlib.metadata.version(package)
    return versions


def reference_vlm_key(settings: ReferenceVLMSettings, data_sha256: str) -> str:
    """Return a 12-hex-digit hash of the settings, the training data, the library versions and `TRAINER_VERSION`.

    NOTE: the CPU model and the number of torch threads are not part of the key, although float results
    can differ between machines.
    """
    payload = {
        "trainer_version": TRAINER_VERSION,
        "settings": dataclasses.asdict(settings),
        "data_sha256": data_sha256,
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def reference_vlm_path(cache_dir: Path | None = None, settings: ReferenceVLMSettings | None = None) -> Path:
    """Return the directory of the model for these settings, whether or not it exists yet. Nothing is trained."""
    settings = settings or ReferenceVLMSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else reference_model.default_cache_dir()
    return cache_dir / (MODEL_DIR_PREFIX + reference_vlm_key(settings, load_image_text_corpus(settings).sha256()))


def ensure_reference_vlm(
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    settings: ReferenceVLMSettings | None = None,
) -> Path:
    """Return the directory of the trained reference VLM, training it first when the cache lacks it.

    The directory contains the model, the tokenizer and processor files, and `training.json`, and loads with
    `AutoModelForImageTextToText` and `gemoe_cli.vlm.load_processor`. The cache works as for
    `reference_model.ensure_reference_model`: a build in a hidden directory renamed into place, and a lock
    file between processes. `force` retrains even when the cache has the model.

    NOTE: when other processes share the cores, set `OMP_WAIT_POLICY=PASSIVE` before torch is imported, as
    `scripts/train_reference_vlm` does.
    """
    settings = settings or ReferenceVLMSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else reference_model.default_cache_dir()
    corpus = load_image_text_corpus(settings)
    key = reference_vlm_key(settings, corpus.sha256())

    def build(partial: Path) -> None:
        build_reference_vlm(partial, settings, corpus, key=key, progress=progress)

    return reference_model.ensure_cached_build(
        cache_dir, MODEL_DIR_PREFIX + key, REQUIRED_FILES, build, progress=progress, force=force
    )


def build_reference_vlm(
    output_dir: Path,
    settings: ReferenceVLMSettings,
    corpus: ImageTextCorpus,
    *,
    key: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tokenizer and model, evaluate them, write all files into `output_dir`, and return the record."""
    import torch

    from gemoe_cli.vlm import save_processor_files

    started = time.perf_counter()
    load_average_start = os.getloadavg()
    tokenizer = train_vlm_tokenizer(corpus.tokenizer_texts(), settings)
    processor = build_processor(tokenizer, settings)
    text_tokens = reference_model.encode_documents(tokenizer, corpus.split.train_segments)
    reference_model.report_progress(
        progress,
        f"data: {len(corpus.photos)} photographs with {sum(len(p.captions) for p in corpus.photos)} captions, "
        f"{text_tokens.numel():,} training text tokens",
    )

    with reference_model.seeded_torch(settings.seed, settings.deterministic_algorithms):
        model = build_vlm(settings, tokenizer)
        evaluation_data = load_evaluation_data(processor, corpus, settings, model.config)
        random_init = evaluate_vlm(model, evaluation_data, settings.eval_batch_size)
        baseline_generator = torch.Generator().manual_seed(settings.seed + 1)
        unit_routers = evaluate_vlm(
            reference_model.with_unit_variance_routers(model, baseline_generator),
            evaluation_data,
            settings.eval_batch_size,
        )
        reference_model.report_progress(
            progress,
            f"training {reference_model.count_parameters(model):,} parameters for {settings.steps} steps of "
            f"{settings.image_batch_size} image+text samples and {settings.text_batch_size} text windows",
        )
        sampler = BatchSampler(corpus, processor, text_tokens, settings, torch.Generator().manual_seed(settings.seed))
        training = train_vlm(model, sampler, settings, evaluation_data=evaluation_data, progress=progress)
        trained = evaluate_vlm(model, evaluation_data, settings.eval_batch_size)

    with reference_model.transformers_progress_bars(progress):
        model.save_pretrained(output_dir)
    save_processor_files(processor, output_dir)
    record = _training_record(
        key=key,
        settings=settings,
        corpus=corpus,
        text_tokens=text_tokens.numel(),
        evaluation_data=evaluation_data,
        model=model,
        training=training,
        evaluations={"trained": trained, "random_init": random_init, "random_unit_variance_routers": unit_routers},
        wall_time_s=time.perf_counter() - started,
        load_average=(load_average_start, os.getloadavg()),
    )
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _training_record(
    *,
    key: str,
    settings: ReferenceVLMSettings,
    corpus: ImageTextCorpus,
    text_tokens: int,
    evaluation_data: EvaluationData,
    model: Qwen3VLMoeForConditionalGeneration,
    training: VLMTrainingResult,
    evaluations: dict[str, VLMEvaluation],
    wall_time_s: float,
    load_average: tuple[tuple[float, float, float], tuple[float, float, float]],
) -> dict[str, Any]:
    import torch

    total = reference_model.count_parameters(model)
    experts = sum(parameter.numel() for name, parameter in model.named_parameters() if ".experts." in name)
    vision = sum(parameter.numel() for name, parameter in model.named_parameters() if ".visual." in name)
    active = total - experts * (1 - settings.num_experts_per_tok / settings.num_experts)
    return {
        "trainer_version": TRAINER_VERSION,
        "cache_key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "parameters": {"total": total, "active_per_token": int(active), "vision_tower": vision},
        "data": {
            "sha256": corpus.sha256(),
            "photos": [entry.photo for entry in corpus.photos],
            "captions": sum(len(entry.captions) for entry in corpus.photos),
            "prompts": list(corpus.prompts),
            "image_license": IMAGE_LICENSE,
            "text_license": reference_model.CORPUS_LICENSE,
            "text_characters": corpus.text.characters,
            "train_text_tokens": text_tokens,
            "heldout_captions": sum(len(entry.captions) for entry in corpus.heldout),
            "evaluation_image_text_samples": len(evaluation_data.image_text),
            "evaluation_heldout_caption_samples": len(evaluation_data.heldout_captions),
            "evaluation_text_windows": int(evaluation_data.text_windows.shape[0]),
        },
        "training": {
            "final_train_loss": round(training.final_train_loss, 4),
            "final_aux_loss": round(training.final_aux_loss, 4),
            "loss_curve": [list(point) for point in training.loss_curve],
            "eval_curve": [{"step": step, **summary} for step, summary in training.eval_curve],
            "eval_time_s": round(training.eval_time_s, 1),
            "tokens_seen": training.tokens_seen,
            "training_wall_time_s": round(training.wall_time_s, 1),
            "total_wall_time_s": round(wall_time_s, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_start": [round(value, 2) for value in load_average[0]],
            "load_average_end": [round(value, 2) for value in load_average[1]],
        },
        "evaluation": {
            "image_text": "the built-in image set (gemoe_cli/calibration/data/builtin_images.jsonl), encoded as "
            "calibration encodes it: the training photographs, whole, with questions and answers never trained on",
            "heldout_captions": "the held-out set (heldout_samples): new crops of the training photographs with "
            "the captions held out from training, the prompts cycling through the training prompts",
            "heldout_text": "non-overlapping windows of text_seq_len tokens of the corpus text held out from training",
            **{name: evaluation.to_json() for name, evaluation in evaluations.items()},
        },
        "versions": library_versions(),
    }


# --- Command line ----------------------------------------------------------------------------------------------


def format_summary(model_dir: Path) -> str:
    """Render the numbers of a model directory's `training.json` as a few lines of text."""
    record = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
    settings = record["settings"]
    training = record["training"]
    evaluation = record["evaluation"]
    lines = [
        f"reference VLM: {model_dir}",
        f"parameters: {record['parameters']['total']:,} ({record['parameters']['active_per_token']:,} active per "
        f"token, {record['parameters']['vision_tower']:,} in the vision tower), {settings['num_hidden_layers']} "
        f"layers, {settings['num_experts']} experts, top-{settings['num_experts_per_tok']}",
        f"training: {settings['steps']} steps in {training['training_wall_time_s']:.0f} s on "
        f"{training['torch_threads']} torch threads (load average {training['load_average_start'][0]} at the "
        f"start, {training['load_average_end'][0]} at the end), final train loss {training['final_train_loss']:.3f}",
    ]
    for name in ("trained", "random_init", "random_unit_variance_routers"):
        result = evaluation[name]
        entropy = ", ".join(f"{group} {value:.3f}" for group, value in result["mean_normalized_entropy"].items())
        distance = ", ".join(f"{value:.2f}" for value in expert_load_distance(result["expert_load"]))
        lines.append(
            f"{name}: answer loss {result['answer_loss']:.3f}, held-out caption loss "
            f"{result['heldout_caption_loss']:.3f}, held-out text loss {result['heldout_text_loss']:.3f}, "
            f"normalised gating entropy {entropy}, image/text expert load distance per layer {distance}"
        )
    return "\n".join(lines)


def expert_load_distance(expert_load: dict[str, list[list[float]]]) -> list[float]:
    """Return, per MoE layer, the total variation distance between the image and held-out text expert loads.

    `expert_load` is the field of a `VLMEvaluation.to_json()` record. The distance is half the sum of absolute
    differences between the two shares of top-k slots per expert: 0 when image and text tokens use the experts
    alike, 1 when they share none.
    """
    return [
        0.5 * sum(abs(image - text) for image, text in zip(image_layer, text_layer, strict=True))
        for image_layer, text_layer in zip(expert_load["image"], expert_load["heldout_text"], strict=True)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_reference_vlm",
        description="Train the small Qwen3-VL-MoE reference model with learned routing, or reuse the cached one, "
        "and print where it is and its numbers.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="directory of cached models (default: $GEMOE_CACHE, else ~/.cache/gemoe)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="retrain even when the cache has the model, or with --write-eval-set, replace an existing DIR",
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress lines on stderr")
    parser.add_argument(
        "--write-eval-set",
        metavar="DIR",
        type=Path,
        default=None,
        help="instead of training, write fresh crops of the photographs with captions (PNG files and "
        "samples.jsonl, a gemoe calibrate dataset) to DIR",
    )
    parser.add_argument(
        "--eval-captions",
        choices=CAPTION_SPLITS,
        default="heldout",
        help="with --write-eval-set: the captions training left out (default) or the training captions",
    )
    parser.add_argument(
        "--crops-per-caption",
        type=int,
        default=None,
        help="with --write-eval-set: crops per caption (default: heldout_crops_per_caption, 3)",
    )
    args = parser.parse_args(argv)
    if args.crops_per_caption is not None and args.crops_per_caption < 1:
        parser.error(f"--crops-per-caption {args.crops_per_caption} must be at least 1")

    if args.write_eval_set is not None:
        from gemoe_cli.errors import GemoeError

        try:
            samples = write_evaluation_set(
                args.write_eval_set,
                captions=args.eval_captions,
                crops_per_caption=args.crops_per_caption,
                force=args.force,
            )
        except GemoeError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        print(samples)
        return 0

    model_dir = ensure_reference_vlm(args.cache_dir, progress=not args.quiet, force=args.force)
    print(format_summary(model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
