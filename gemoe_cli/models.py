"""Load Hugging Face models and configs for gemoe, from a local directory or a hub id.

Nothing here reaches the network for a local directory; a hub id is fetched by transformers as usual
(and not at all when ``HF_HUB_OFFLINE=1``). Weights load from safetensors only unless the caller allows
pickle files explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemoe_cli.errors import InvalidInputError, UnsupportedModelError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# String values of from_pretrained's device_map that name a placement strategy instead of a device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModel")


def load_config(source: str, trust_remote_code: bool = False):
    """Load a model's config from a directory or hub id, raising `InvalidInputError` when it is missing."""
    from transformers import AutoConfig

    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise InvalidInputError(f"{source} has no config.json; pass a Hugging Face model directory or hub id.")
    if not path.exists() and _looks_like_path(source):
        raise InvalidInputError(f"model directory {source} not found; check the path.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidInputError(f"cannot load the config of {source}: {first_line}") from error


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(os.path.sep)


def model_class_for(config):
    """Return the transformers class that builds this config's full model.

    Vision-language configs get their image-text-to-text class, vision tower included
    (`gemoe_cli.vlm.vision_language_class`). Other configs get the first auto class that maps them, tried in
    the order of `_AUTO_CLASSES`.
    """
    import transformers

    from gemoe_cli.vlm import vision_language_class

    vision_language = vision_language_class(config)
    if vision_language is not None:
        return vision_language
    for name in _AUTO_CLASSES:
        auto_class = getattr(transformers, name, None)
        if auto_class is not None and type(config) in auto_class._model_mapping:
            return auto_class
    raise UnsupportedModelError(
        f"model type {config.model_type!r} has no causal-LM, image-text-to-text or base model class in transformers."
    )


def build_skeleton(config):
    """Instantiate a model on the ``meta`` device: module structure without memory for weights."""
    import torch

    with torch.device("meta"):
        try:
            return model_class_for(config).from_config(config)
        except (AttributeError, ValueError, TypeError):
            # Omni models whose full build fails in transformers 5.23 (the talker) still have a thinker to inspect.
            thinker = getattr(config, "thinker_config", None)
            if thinker is None:
                raise
            return model_class_for(thinker).from_config(thinker)


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a model with weights, from safetensors only unless `allow_pickle` is set."""
    if device_map is not None:
        check_device_map(device_map)
    config = load_config(source, trust_remote_code=trust_remote_code)
    auto_class = model_class_for(config)
    if device_map is None:
        check_memory(config, dtype)
    path = Path(source)
    if path.is_dir() and not allow_pickle and not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise InvalidInputError(
                f"{source} has only pickle (.bin/.pt) weights; convert them to safetensors, or pass "
                "--allow-pickle if you trust the files."
            )
        raise InvalidInputError(f"{source} has no *.safetensors weights; check the directory.")
    from safetensors import SafetensorError

    try:
        model = auto_class.from_pretrained(
            source,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as error:
        raise InvalidInputError(f"cannot load the weights of {source}: {str(error).splitlines()[0]}") from error
    except SafetensorError as error:
        if not path.is_dir():
            raise
        raise InvalidInputError(_corrupt_weights_message(path, error)) from error
    return model.eval()


def _corrupt_weights_message(folder: Path, error: Exception) -> str:
    """Return the message for weights that safetensors cannot read, naming the first file whose header fails."""
    from safetensors import SafetensorError, safe_open

    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    broken = str(folder)
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError):
            broken = str(file)
            break
    # NOTE: when every header reads, the damage is in the tensor data and the message names the folder.
    return (
        f"cannot read the weights {broken}: {reason}; the file is truncated or corrupt, so download or save "
        "the checkpoint again."
    )


def check_device_map(device_map: str) -> None:
    """Raise `InvalidInputError` for an unknown `device_map`, a device this machine lacks, or missing accelerate.

    transformers 5.23 accepts a placement strategy (`DEVICE_MAP_STRATEGIES`), a torch device string or a GPU
    number, and places the weights through the accelerate package.
    """
    import importlib.util

    import torch

    if device_map not in DEVICE_MAP_STRATEGIES and not device_map.isdigit():
        try:
            torch.device(device_map)
        except RuntimeError:
            raise InvalidInputError(
                f"--device-map {device_map} is unknown; use {', '.join(DEVICE_MAP_STRATEGIES)}, or a device such as "
                "cpu, cuda, cuda:N or mps."
            ) from None
    if (device_map.startswith("cuda") or device_map.isdigit()) and not torch.cuda.is_available():
        raise InvalidInputError(
            f"--device-map {device_map} is not available: no CUDA GPU found; use --device-map cpu or leave it out."
        )
    if device_map == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            "--device-map mps is not available on this machine; use --device-map cpu or leave it out."
        )
    if importlib.util.find_spec("accelerate") is None:
        raise InvalidInputError(
            f"--device-map {device_map} needs the accelerate package, which is not installed; "
            "pip install accelerate, or leave --device-map out."
        )


def resolve_device(name: str) -> str:
    """Return a usable torch device for ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.

    Raises:
        InvalidInputError: the device is unknown or not available on this machine.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {name} is not available: no CUDA GPU found; use --device cpu or auto.")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError("--device mps is not available on this machine; use --device cpu or auto.")
        return name
    raise InvalidInputError(f"--device {name} is unknown; use auto, cpu, cuda, cuda:N or mps.")


def has_tokenizer_files(source: str) -> bool:
    """Return whether `source` can have a tokenizer: a hub id, or a local folder with tokenizer files.

    transformers 5 builds a placeholder tokenizer from the config when a folder has no tokenizer files, so
    `AutoTokenizer.from_pretrained` succeeding does not prove that the model has a tokenizer.
    """
    path = Path(source)
    return not path.is_dir() or any((path / name).exists() for name in _TOKENIZER_FILES)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """Load the tokenizer saved with a model, raising `InvalidInputError` when the model has none."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(source):
        raise InvalidInputError(
            f"model {source} has no usable tokenizer (no {', '.join(_TOKENIZER_FILES[:2])}); save one with the model."
        )
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidInputError(
            f"model {source} has no usable tokenizer ({type(error).__name__}); save one with the model."
        ) from error


def max_positions(config) -> int | None:
    """Return the model's position limit from its (text) config, if it declares one."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


_BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def estimate_weight_bytes(config, dtype: str = "auto") -> int:
    """Estimate the memory the weights need: parameter count (from a meta-device build) x bytes per value."""
    skeleton = build_skeleton(config)
    count = sum(parameter.numel() for parameter in skeleton.parameters())
    if dtype == "auto":
        configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = str(configured).removeprefix("torch.") if configured is not None else "float32"
    return count * _BYTES_PER_DTYPE.get(dtype, 4)


def available_memory_bytes() -> int | None:
    """Return the memory available to new allocations (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(config, dtype: str = "auto") -> None:
    """Raise `InvalidInputError` before loading when the weights alone cannot fit in available memory."""
    needed = estimate_weight_bytes(config, dtype)
    available = available_memory_bytes()
    if available is not None and needed > available:
        gib = 2**30
        raise InvalidInputError(
            f"the model needs about {needed / gib:.1f} GiB for its weights but {available / gib:.1f} GiB is "
            "available; pass --dtype bfloat16, --device-map auto, or use a machine with more memory."
        )
