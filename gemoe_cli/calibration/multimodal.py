"""Image+text calibration data: run each sample through the model's chat template and processor.

A sample becomes one `MultimodalBatch`: the processor's tensors for that one chat (a batch of 1, so no padding
token ever reaches a router), the positions whose tokens retention scores, and the length of the prompt.
Scored tokens are the last assistant turn (the answer) when the sample has one, else the text after the
last image. Retention is the next-token NLL on those tokens given the image, plus exact-match agreement of
the greedy answers of the static and adaptive model.

Every sample is encoded before the model loads, so a bad sample stops the run (or is skipped and counted
with `--skip-bad-samples`) before anything expensive runs. The encoded tensors stay in memory: about 6 MB
per one-megapixel image for Qwen-style processors (1,300 patches of 1,176 float32 values).

Legend for shape comments: L tokens of one sample.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from gemoe_cli.calibration.bad_samples import BadSamples, SampleError
from gemoe_cli.calibration.images import ImageTextSample, open_image
from gemoe_cli.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass
class MultimodalBatch:
    """The processor's output for one image+text sample, with what retention scores."""

    inputs: dict[str, torch.Tensor]
    """Keyword arguments for the model's forward: ``input_ids`` (1, L), ``pixel_values``, ..."""
    target_mask: torch.Tensor  # (1, L) bool: tokens scored by NLL
    prompt_length: int
    """Tokens before the answer; greedy generation starts there."""
    origin: str = ""
    images: int = 0
    """Images in the sample."""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def size(self, dim: int = 0) -> int:
        """Return the shape of ``input_ids`` along `dim`, so progress counters treat it like a token block."""
        return self.input_ids.size(dim)

    def numel(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> MultimodalBatch:
        inputs = {name: value.to(device) for name, value in self.inputs.items()}
        return MultimodalBatch(inputs, self.target_mask.to(device), self.prompt_length, self.origin, self.images)

    def prompt_inputs(self) -> dict[str, torch.Tensor]:
        """Return the inputs cut before the answer: every (1, L) tensor keeps its first `prompt_length` tokens."""
        length = self.input_ids.size(1)
        return {
            name: value[:, : self.prompt_length] if value.dim() == 2 and value.size(1) == length else value
            for name, value in self.inputs.items()
        }

    def prompt(self) -> MultimodalBatch:
        """Return the sample cut before its answer, as a batch with nothing to score."""
        inputs = self.prompt_inputs()
        mask = self.target_mask[:, : self.prompt_length]
        return MultimodalBatch(inputs, torch.zeros_like(mask), self.prompt_length, self.origin, self.images)

    @property
    def answer_length(self) -> int:
        return self.input_ids.size(1) - self.prompt_length


@dataclass(frozen=True)
class MultimodalCalibrationData:
    """Encoded image+text samples for fitting and for held-out measurement."""

    source: str
    fit: list[MultimodalBatch]
    heldout: list[MultimodalBatch]
    samples_read: int
    tokens_available: int
    bad_samples: dict = field(default_factory=dict)

    @property
    def fit_count(self) -> int:
        return len(self.fit)

    @property
    def heldout_count(self) -> int:
        return len(self.heldout)

    def batches(self, part: str, batch_size: int) -> list[MultimodalBatch]:
        """Return the samples of `part`, one per batch: image samples are never padded together."""
        return list(self.fit if part == "fit" else self.heldout)


def render_chat(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render a chat with the processor's chat template (or the tokenizer's)."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    raise InvalidInputError("the model's processor has no chat template; save one with the model.")


def _process(processor, text: str, images: list) -> dict[str, torch.Tensor]:
    try:
        encoded = processor(text=[text], images=images or None, return_tensors="pt")
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SampleError("processor error", f"the processor rejected the sample: {first_line}") from None
    return {name: value for name, value in encoded.items() if isinstance(value, torch.Tensor)}


def _common_prefix(first: torch.Tensor, second: torch.Tensor) -> int:
    length = min(first.numel(), second.numel())
    differs = (first[:length] != second[:length]).nonzero()
    return int(differs[0]) if differs.numel() else length


def encode_sample(
    sample: ImageTextSample,
    processor,
    placeholders: set[int],
    *,
    max_images: int | None,
    max_tokens: int | None,
) -> MultimodalBatch:
    """Encode one sample through the chat template and the processor.

    Args:
        placeholders: token ids that stand for image features; without an answer, scoring starts after the last.
        max_images: the maximum number of images of one sample.
        max_tokens: the model's position limit, which image and text tokens share.

    Raises:
        SampleError: an image is missing or unreadable, there are too many images or tokens, or the
            processor rejects the sample.
    """
    if max_images is not None and len(sample.images) > max_images:
        raise SampleError(
            "too many images", f"the sample has {len(sample.images)} images, more than the limit of {max_images}"
        )
    images = [open_image(source) for source in sample.images]

    full = _process(processor, render_chat(processor, sample.messages, add_generation_prompt=False), images)
    input_ids = full["input_ids"]  # (1, L)
    length = input_ids.size(1)
    if max_tokens is not None and length > max_tokens:
        raise SampleError(
            "too many tokens",
            f"the sample is {length} tokens with its images, above the model's limit of {max_tokens} positions",
        )

    if sample.has_answer:
        last = max(i for i, message in enumerate(sample.messages) if message.get("role") == "assistant")
        prompt_text = render_chat(processor, sample.messages[:last], add_generation_prompt=True)
        prompt_ids = _process(processor, prompt_text, images)["input_ids"]
        prompt_length = _common_prefix(input_ids[0], prompt_ids[0])
    else:
        is_placeholder = torch.isin(input_ids[0], torch.tensor(sorted(placeholders), dtype=input_ids.dtype))
        positions = is_placeholder.nonzero()
        prompt_length = int(positions[-1]) + 1 if positions.numel() else 0
    prompt_length = max(prompt_length, 1)  # the first token is never predicted

    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[:, prompt_length:] = True
    if not target_mask.any():
        raise SampleError("nothing to score", "the sample has no answer or text after its images to score")
    return MultimodalBatch(full, target_mask, prompt_length, sample.origin, len(images))


def build_multimodal_data(
    samples: list[ImageTextSample],
    processor,
    source: str,
    *,
    placeholders: set[int],
    num_samples: int,
    seed: int,
    heldout_fraction: float,
    max_images: int | None,
    max_tokens: int | None,
    bad_samples: BadSamples,
) -> MultimodalCalibrationData:
    """Shuffle `samples` with the seed, encode up to `num_samples` good ones and split them fit / held-out.

    Raises:
        InvalidInputError: a sample is bad and skipping is off, or fewer than two good samples remain.
    """
    if num_samples < 2:
        raise InvalidInputError(f"--num-samples {num_samples} is too small; use at least 2 (fit and held-out).")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)

    encoded: list[MultimodalBatch] = []
    for index in order:
        if len(encoded) == num_samples:
            break
        sample = samples[index]
        try:
            encoded.append(encode_sample(sample, processor, placeholders, max_images=max_images, max_tokens=max_tokens))
        except SampleError as error:
            bad_samples.add(sample.origin, error)
    if bad_samples.total:
        logger.warning("skipped %d bad samples: %s", bad_samples.total, dict(bad_samples.counts))
    if len(encoded) < 2:
        raise InvalidInputError(
            f"dataset {source} has {len(encoded)} usable image+text samples ({bad_samples.total} skipped); "
            "calibration needs at least 2, one to fit and one held out."
        )

    heldout = min(max(1, round(len(encoded) * heldout_fraction)), len(encoded) - 1)
    tokens = sum(batch.numel() for batch in encoded)
    return MultimodalCalibrationData(
        source, encoded[heldout:], encoded[:heldout], len(samples), tokens, bad_samples.to_json()
    )


def load_image_text_batches(
    source: str,
    *,
    dataset: str | None = None,
    num_samples: int = 16,
    seed: int = 0,
    prompt_template: str | None = None,
    max_images: int | None = None,
    skip_bad_samples: bool = False,
    trust_remote_code: bool = False,
) -> list[MultimodalBatch]:
    """Encode up to `num_samples` image+text samples for the vision-language model at `source`, in seed order.

    This is the entry point for callers other than calibration (benchmarks): each batch runs with
    `gemoe_cli.calibration.retention.model_forward` (a prefill over image and text tokens), and
    ``batch.prompt_inputs()`` is the prompt to generate an answer from. `dataset` defaults to the built-in
    image set. Nothing loads the model's weights.

    Raises:
        InvalidInputError: the model is not a vision-language model, a sample is bad (and skipping is off),
            or fewer than one usable sample remains.
    """
    from gemoe_cli.calibration.images import BUILTIN_IMAGES, DEFAULT_PROMPT_TEMPLATE, read_image_text_samples
    from gemoe_cli.models import load_config, max_positions
    from gemoe_cli.routing.modality import placeholder_token_ids
    from gemoe_cli.vlm import family_of, load_processor

    config = load_config(source, trust_remote_code=trust_remote_code)
    if family_of(config) is None:
        raise InvalidInputError(f"model {source} has no vision tower, so it takes no image+text samples.")
    processor = load_processor(source, config, trust_remote_code=trust_remote_code)
    samples = read_image_text_samples(dataset or BUILTIN_IMAGES, prompt_template or DEFAULT_PROMPT_TEMPLATE)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    placeholders = {token for ids in placeholder_token_ids(config).values() for token in ids}
    bad_samples = BadSamples(skip=skip_bad_samples)
    batches = []
    for index in order:
        if len(batches) == num_samples:
            break
        try:
            batches.append(
                encode_sample(
                    samples[index], processor, placeholders, max_images=max_images, max_tokens=max_positions(config)
                )
            )
        except SampleError as error:
            bad_samples.add(samples[index].origin, error)
    if not batches:
        raise InvalidInputError(f"no usable image+text sample in {dataset or BUILTIN_IMAGES}.")
    return batches
