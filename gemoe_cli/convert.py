"""Convert: apply a recipe, save a loadable adaptive checkpoint, and load one back.

A converted directory holds the original weights (safetensors), the tokenizer or processor files, a
``config.json`` with a ``gemoe`` section (routing settings and per-layer thresholds) and an ``auto_map``
entry pointing at the generated ``modeling_gemoe.py``, and a model card. It loads two ways:

- `load_adaptive_model(path)` with gemoe installed, no remote code;
- ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` with only torch and transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gemoe_cli import __version__
from gemoe_cli.atomic import atomic_directory, check_output_directory
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.recipe import Recipe, encode_threshold

logger = logging.getLogger(__name__)

REMOTE_CODE_FILE = "modeling_gemoe.py"
REMOTE_CLASS_NAME = "GemoeModel"
CONFIG_KEY = "gemoe"


def gemoe_config_section(recipe: Recipe) -> dict:
    """Return the ``gemoe`` section of config.json for a recipe.

    Per-modality thresholds, when the recipe has them, go under ``modality_thresholds`` (path -> modality ->
    thresholds); loaders that predate them ignore the key and route every token with ``thresholds``.
    """
    measured = (recipe.calibration or {}).get("measured", {})
    section = {
        "format_version": 1,
        "tool": f"gemoe {__version__}",
        "k_min": recipe.routing.k_min,
        "k_max": recipe.routing.k_max,
        "renormalize": recipe.routing.renormalize,
        "thresholds": {
            path: [encode_threshold(value) for value in layer.thresholds] for path, layer in recipe.layers.items()
        },
        "router_fingerprint": recipe.model.router_fingerprint,
        "measured": measured,
    }
    if recipe.per_modality:
        section["modality_thresholds"] = {
            path: {name: [encode_threshold(value) for value in values] for name, values in layer.modalities.items()}
            for path, layer in recipe.layers.items()
            if layer.modalities
        }
    return section


def modality_thresholds_from_section(settings: dict) -> dict[str, dict[str, list[float]]]:
    """Return the per-modality thresholds of a ``gemoe`` config section as floats (empty when it has none)."""
    return {
        path: {name: [float(value) for value in values] for name, values in by_modality.items()}
        for path, by_modality in settings.get("modality_thresholds", {}).items()
    }


def _model_card(source: str, recipe: Recipe, auto_class: str) -> str:
    measured = (recipe.calibration or {}).get("measured", {})
    budget = (recipe.calibration or {}).get("budget", {})
    metric = budget.get("metric", "nll")

    def figure(key: str) -> str:
        value = measured.get(key)
        return "not measured" if value is None else f"{value:.4f}"

    return f"""---
library_name: transformers
tags:
- gemoe
- mixture-of-experts
- adaptive-routing
base_model: {source}
---

# {Path(source).name} with gating-entropy adaptive routing

This checkpoint is `{source}` with its routers rewritten by [gemoe](https://pypi.org/project/gemoe/) {__version__}:
each token engages between {recipe.routing.k_min} and {recipe.resolved_k_max} of its top-{recipe.model.top_k}
experts, fewer when its router is confident (low gating entropy). The weights are unchanged.

| measured on held-out calibration data | value |
|---|---|
| expert-activation sparsity | {figure("heldout_sparsity")} |
| retention ({metric}) | {figure("heldout_retention")} |
| held-out tokens | {measured.get("heldout_tokens", "not measured")} |

Thresholds and settings are in `config.json` under `"gemoe"`; the recipe that produced them is
`gemoe_recipe.yaml`.

## Load

With gemoe installed:

```python
from gemoe_cli.convert import load_adaptive_model
model = load_adaptive_model("path/to/this/directory")
```

With only torch and transformers:

```python
from transformers import {auto_class}
model = {auto_class}.from_pretrained("path/to/this/directory", trust_remote_code=True)
```

## Evaluate with lm-eval

```bash
lm_eval --model hf --model_args pretrained=path/to/this/directory,trust_remote_code=True --tasks lambada_openai
```
"""


def _save_tokenizer(source: str, directory: Path, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    from gemoe_cli.models import has_tokenizer_files

    if not has_tokenizer_files(source):
        logger.warning("no tokenizer saved: %s has no tokenizer files, so the checkpoint has no tokenizer", source)
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("no tokenizer saved: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    try:
        tokenizer.save_pretrained(directory)
    except (ValueError, TypeError, KeyError) as error:
        logger.warning("no tokenizer saved: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True


def _save_preprocessors(source: str, directory: Path, trust_remote_code: bool) -> list[str]:
    """Copy the tokenizer and, for multimodal models, the processor; return what was saved.

    Processor files that transformers cannot load here (a video processor without torchvision) are copied
    as files from a local source directory, so the checkpoint keeps its image processor and chat template.
    """
    import shutil

    from transformers import AutoProcessor

    from gemoe_cli.vlm import CHAT_TEMPLATE_FILE, PROCESSOR_FILES

    # An OSError from loading means the source has no such files. From saving it means the output is broken
    # (a full disk), so it is not caught there and the conversion stops.
    saved = ["tokenizer"] if _save_tokenizer(source, directory, trust_remote_code) else []
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError):
        processor = None
    if processor is not None and (
        not hasattr(processor, "model_input_names") or type(processor).__name__.endswith("Processor")
    ):
        try:
            processor.save_pretrained(directory)
            saved.append("processor")
        except (ValueError, TypeError, KeyError, ImportError, AttributeError):
            pass  # the processor files are copied from the source below
    source_path = Path(source)
    if "processor" not in saved and source_path.is_dir():
        copied = [name for name in (*PROCESSOR_FILES, CHAT_TEMPLATE_FILE) if (source_path / name).is_file()]
        for name in copied:
            shutil.copyfile(source_path / name, directory / name)
        if copied:
            saved.append("processor files")
    return saved


def convert(
    source: str,
    recipe: Recipe,
    output: Path,
    *,
    dtype: str = "auto",
    device_map: str | None = None,
    force: bool = False,
    ignore_fingerprint: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write an adaptive checkpoint of `source` for `recipe` to `output`, atomically.

    Raises:
        InvalidInputError: `output` is or contains the source folder, exists without `force`, or cannot be
            created, or the weights are missing or corrupt.
        RecipeMismatchError: the recipe describes another model.
    """
    from gemoe_cli.api import apply_recipe
    from gemoe_cli.models import load_model
    from gemoe_cli.recipe import recipe_to_yaml
    from gemoe_cli.remote_code import generate_remote_code
    from gemoe_cli.vlm import auto_class_name

    output = Path(output)
    check_output_directory(output, force=force, inputs={"model folder": Path(source)})

    model = load_model(
        source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    # Attaching validates the recipe against the model; the saved weights stay the original ones.
    apply_recipe(model, recipe, ignore_fingerprint=ignore_fingerprint).remove()

    auto_class = auto_class_name(model.config)
    base_class = type(model).__name__
    with atomic_directory(output, force=force) as directory:
        model.config.gemoe = gemoe_config_section(recipe)
        model.config.auto_map = {auto_class: f"{REMOTE_CODE_FILE.removesuffix('.py')}.{REMOTE_CLASS_NAME}"}
        try:
            model.save_pretrained(directory, safe_serialization=True)
        finally:
            del model.config.gemoe
            del model.config.auto_map
        (directory / REMOTE_CODE_FILE).write_text(generate_remote_code(base_class, REMOTE_CLASS_NAME), "utf-8")
        (directory / "gemoe_recipe.yaml").write_text(recipe_to_yaml(recipe), "utf-8")
        _save_preprocessors(source, directory, trust_remote_code)
        (directory / "README.md").write_text(_model_card(source, recipe, auto_class), "utf-8")
    logger.info("adaptive checkpoint written to %s", output)
    return output


def read_gemoe_section(path: Path) -> dict:
    """Return the ``gemoe`` section of a converted checkpoint's config.json."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"cannot read {config_file}: {error}; pass a directory written by gemoe convert."
        ) from error
    if CONFIG_KEY not in config:
        raise InvalidInputError(f"{path} is not a gemoe checkpoint (config.json has no 'gemoe' section).")
    return config[CONFIG_KEY]


def load_adaptive_model(path: str | Path, **load_options):
    """Load a converted checkpoint with its adaptive routing attached; no remote code runs.

    The handle of the attached routing (counters, `remove()`) is `model.gemoe_routing`. `load_options`
    go to `gemoe_cli.models.load_model` (dtype, device_map, ...).
    """
    from gemoe_cli.models import load_model
    from gemoe_cli.routing import attach_adaptive_routing

    settings = read_gemoe_section(Path(path))
    model = load_model(str(path), **load_options)
    model.gemoe_routing = attach_adaptive_routing(
        model,
        {p: [float(value) for value in values] for p, values in settings["thresholds"].items()},
        k_min=int(settings["k_min"]),
        k_max=None if settings.get("k_max") is None else int(settings["k_max"]),
        renormalize=settings["renormalize"],
        modality_thresholds=modality_thresholds_from_section(settings),
    )
    return model
