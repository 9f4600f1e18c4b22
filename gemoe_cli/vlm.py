"""Vision-language models: which class to load, where the forward pass runs, and how to get a processor.

A model is vision-language when its config has a vision tower config (``vision_config``, or
``thinker_config.vision_config`` for Qwen3-Omni). For those, gemoe loads the image-text-to-text class, so the
vision tower and its weights stay in the model, and runs image+text samples through the model's own processor.

Two transformers 5.23 facts shape this module:

- ``qwen3_omni_moe`` has no auto class. gemoe loads `Qwen3OmniMoeForConditionalGeneration` and runs its
  ``thinker`` (the part that reads text, images, audio and video and writes text). The talker, which turns the
  thinker's output into speech, has MoE layers too; they see no tokens in a text-output forward pass.
- Every video processor requires torchvision, and the processors of qwen3_vl_moe, glm4v_moe, ernie4_5_vl_moe
  and qwen3_omni_moe reject a missing video processor. Without torchvision, `load_processor` assembles the
  processor from its image processor, tokenizer and chat template with no video processor: images work,
  videos do not. llama4's image processor itself requires torchvision, so llama4 needs it installed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gemoe_cli.errors import InvalidInputError

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
"""Files besides the tokenizer's that hold a processor's settings, copied with a converted checkpoint."""


@dataclass(frozen=True)
class VisionLanguageFamily:
    """Facts about one vision-language family beyond its text stack.

    Attributes:
        model_type: `config.model_type` of the full (vision + text) model.
        model_class: the transformers class to load when no auto class maps the config; `None` uses
            ``AutoModelForImageTextToText``.
        forward_module: attribute path from the loaded model to the module that takes the processor's
            output; empty for the model itself.
        note: what adaptive routing covers in this family, shown by `gemoe inspect`.
    """

    model_type: str
    model_class: str | None = None
    forward_module: str = ""
    note: str = ""


_FAMILIES = {
    family.model_type: family
    for family in (
        VisionLanguageFamily("qwen3_vl_moe", note="MoE layers are in the text decoder; image tokens route there"),
        VisionLanguageFamily(
            "qwen3_omni_moe",
            model_class="Qwen3OmniMoeForConditionalGeneration",
            forward_module="thinker",
            note="the thinker runs image+text samples; the talker's MoE layers see no tokens and stay static",
        ),
        VisionLanguageFamily("glm4v_moe", note="MoE layers are in the text decoder; image tokens route there"),
        VisionLanguageFamily(
            "ernie4_5_vl_moe",
            note="each decoder MoE layer has text experts (text_moe) and vision experts (vision_moe); "
            "vision_moe routes the image and video tokens, start and end markers included",
        ),
        VisionLanguageFamily("aria", note="MoE layers are in the text decoder; image tokens route there"),
        VisionLanguageFamily("llama4", note="MoE layers are in the text decoder; image tokens route there"),
        VisionLanguageFamily(
            "dots3_note",
            note="the vision tower has MoE layers of its own, which route image patches before the decoder",
        ),
    )
}


def family_of(config) -> VisionLanguageFamily | None:
    """Return the vision-language family of a config, or `None` for a model without a vision tower."""
    if not is_vision_language(config):
        return None
    return _FAMILIES.get(config.model_type, VisionLanguageFamily(config.model_type))


def is_vision_language(config) -> bool:
    """Return whether the config describes a model with a vision tower."""
    if getattr(config, "vision_config", None) is not None:
        return True
    thinker = getattr(config, "thinker_config", None)
    return thinker is not None and getattr(thinker, "vision_config", None) is not None


def vision_language_class(config):
    """Return the class that loads a full vision-language model, vision tower included; `None` otherwise."""
    import transformers

    family = family_of(config)
    if family is None:
        return None
    if family.model_class is not None:
        return getattr(transformers, family.model_class)
    auto_class = transformers.AutoModelForImageTextToText
    return auto_class if type(config) in auto_class._model_mapping else None


def model_class_for(config):
    """Return the class that loads `config`'s full model (`gemoe_cli.models.model_class_for`)."""
    from gemoe_cli import models

    return models.model_class_for(config)


def auto_class_name(config) -> str:
    """Return the auto class name that a converted checkpoint's ``auto_map`` should use for `config`.

    Families loaded through an explicit class (Qwen3-Omni) map ``AutoModel``, which loads remote code from
    ``auto_map`` even for a config type that no auto class maps.
    """
    model_class = model_class_for(config)
    return "AutoModel" if not model_class.__name__.startswith("Auto") else model_class.__name__


def forward_module(model):
    """Return the module of `model` that takes a processor's output (the model itself for most families)."""
    family = family_of(model.config)
    module = model
    if family is not None and family.forward_module:
        for name in family.forward_module.split("."):
            module = getattr(module, name)
    return module


# --- processors ------------------------------------------------------------------------------------------------


@contextmanager
def _allow_missing_video_processor() -> Iterator[None]:
    """Let a processor be constructed with ``video_processor=None`` (transformers 5.23 rejects it)."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def image_only_processor(processor_class, image_processor, tokenizer, chat_template: str | None, **parts):
    """Construct `processor_class` without a video processor, for image+text inputs only.

    `parts` are the processor's other attributes (Qwen3-Omni's ``feature_extractor``).
    """
    arguments = {"image_processor": image_processor, "tokenizer": tokenizer, **parts}
    if "video_processor" in processor_class.get_attributes():
        arguments["video_processor"] = None
    with _allow_missing_video_processor():
        return processor_class(**arguments, chat_template=chat_template)


def save_processor_files(processor, directory) -> None:
    """Save a processor's tokenizer, image processor and chat template; an absent video processor is skipped.

    Without a video processor, transformers 5.23's ``save_pretrained`` writes nothing, so the parts are saved
    one by one. A feature extractor (Qwen3-Omni's) would overwrite the image processor's
    ``preprocessor_config.json``, so both go nested into ``processor_config.json`` as well, the layout that
    transformers reads first.
    """
    directory = Path(directory)
    if getattr(processor, "video_processor", "absent") is not None:
        processor.save_pretrained(directory)
        return
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    settings = {"processor_class": type(processor).__name__, "image_processor": processor.image_processor.to_dict()}
    feature_extractor = getattr(processor, "feature_extractor", None)
    if feature_extractor is not None:
        settings["feature_extractor"] = feature_extractor.to_dict()
    if isinstance(processor.chat_template, str):
        (directory / CHAT_TEMPLATE_FILE).write_text(processor.chat_template, "utf-8")
    (directory / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n", "utf-8")


def load_processor(source: str, config, trust_remote_code: bool = False):
    """Load the processor saved with a vision-language model.

    Without torchvision, processors that require a video processor are assembled for images only. With it,
    a processor whose video part fails to load (a checkpoint saved without a video processor, whose image
    settings the video processor rejects) is assembled for images only as well.

    Raises:
        InvalidInputError: the model has no processor files, or its image processor needs a missing package.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as error:
        if not _torchvision_available():
            logger.info("processor of %s needs torchvision for videos; loading it for images only", source)
            return _load_image_only_processor(source, config, trust_remote_code)
        full_error = error

    try:
        processor = _load_image_only_processor(source, config, trust_remote_code)
    except InvalidInputError:
        raise InvalidInputError(f"cannot load the processor of {source}: {_first_line(full_error)}") from full_error
    logger.info(
        "processor of %s failed to load in full (%s); loading it for images only", source, _first_line(full_error)
    )
    return processor


def _load_image_only_processor(source: str, config, trust_remote_code: bool):
    import transformers
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    class_name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if class_name is None:
        raise InvalidInputError(f"model type {config.model_type!r} has no processor class in transformers.")
    processor_class = getattr(transformers, class_name)
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ImportError as error:
        raise InvalidInputError(
            f"the image processor of {source} requires torchvision ({_first_line(error)}); pip install torchvision."
        ) from error
    except (OSError, ValueError) as error:
        if "torchvision" in str(error):
            # transformers 5.23 raises ValueError, not ImportError, when the only image processor class of a
            # model needs torchvision.
            raise InvalidInputError(
                f"the image processor of {source} requires torchvision, which is not installed; "
                "pip install torchvision."
            ) from error
        raise InvalidInputError(
            f"model {source} has no usable image processor ({_first_line(error)}); save its processor with it."
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    parts = {}
    if "feature_extractor" in processor_class.get_attributes():
        parts["feature_extractor"] = AutoFeatureExtractor.from_pretrained(source)
    return image_only_processor(processor_class, image_processor, tokenizer, _chat_template(source, tokenizer), **parts)


def _chat_template(source: str, tokenizer) -> str | None:
    path = Path(source) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text("utf-8")
    return getattr(tokenizer, "chat_template", None)


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
