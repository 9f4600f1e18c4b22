"""The whole `gemoe bench` run from a model source: validate, load, build the inputs, benchmark.

Everything cheap is checked before the weights load: the device, the config and family, the recipe
against the model's structure, the tokenizer or processor, the evaluation data and the position limit.
Vision-language models run on image+text samples (the built-in image set unless `dataset` names another),
read and split as `gemoe calibrate` reads them; text-only models run on token blocks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from gemoe_cli.bench.runner import BenchInputs, Progress, build_image_text_inputs, build_inputs, run_benchmark
from gemoe_cli.bench.settings import BenchSettings
from gemoe_cli.calibration.images import DEFAULT_PROMPT_TEMPLATE
from gemoe_cli.errors import InvalidInputError, UnsupportedModelError

logger = logging.getLogger(__name__)


def recipe_from_checkpoint(path: Path, description):
    """Build a `Recipe` from the ``gemoe`` section of a converted checkpoint's config.json.

    The section stores routing settings, thresholds and the router fingerprint. The model type and shape
    come from `description` (the checkpoint's own config), so only the fingerprint and the layer paths can
    disagree with the weights.
    """
    from pydantic import ValidationError

    from gemoe_cli.convert import read_gemoe_section
    from gemoe_cli.recipe import Recipe

    keys = _read_config_keys(path / "config.json")
    if keys is not None and "gemoe" not in keys:
        raise InvalidInputError(
            f"no --recipe given and {path} is not converted (its config.json has no gemoe section); pass "
            "--recipe FILE from gemoe calibrate, or convert the model first with gemoe convert."
        )
    section = read_gemoe_section(path)
    fingerprint = section.get("router_fingerprint")
    if not isinstance(fingerprint, str):
        raise InvalidInputError(
            f"{path}/config.json: the gemoe section has no router_fingerprint; convert the model again."
        )
    data = {
        "format_version": 1,
        "model": {
            "model_type": description.model_type,
            "num_moe_layers": description.num_moe_layers,
            "num_experts": description.layers[0].num_experts,
            "top_k": description.layers[0].top_k,
            "router_fingerprint": fingerprint,
            "name_or_path": str(path),
        },
        "routing": {
            "k_min": section.get("k_min", 1),
            "k_max": section.get("k_max"),
            "renormalize": section.get("renormalize", "preserve_mass"),
        },
        "layers": {layer: {"thresholds": values} for layer, values in section.get("thresholds", {}).items()},
    }
    modality_thresholds = section.get("modality_thresholds", {})
    if not isinstance(modality_thresholds, dict):
        raise InvalidInputError(
            f"{path}/config.json: the gemoe section's modality_thresholds is not a mapping; convert the model again."
        )
    for layer, by_modality in modality_thresholds.items():
        data["layers"].setdefault(layer, {"thresholds": []})["modalities"] = by_modality
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInputError(
            f"{path}/config.json: the gemoe section is invalid at {where}: {first['msg']}; convert the model again."
        ) from None
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}/config.json: the gemoe section is invalid: {error}") from None


def _read_config_keys(config_file: Path) -> set[str] | None:
    """Return the top-level keys of a config.json, or None when it is unreadable (`read_gemoe_section` reports that)."""
    import json

    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return set(data) if isinstance(data, dict) else None


def resolve_recipe(source: str, recipe_path: Path | None, description):
    """Return (recipe, where it came from): the `--recipe` file, or the converted checkpoint's config."""
    from gemoe_cli.recipe import load_recipe

    if recipe_path is not None:
        if Path(source).is_dir() and (Path(source) / "config.json").is_file():
            logger.info("using --recipe %s instead of any thresholds stored in %s", recipe_path, source)
        return load_recipe(recipe_path), str(recipe_path)
    if not Path(source).is_dir():
        raise InvalidInputError(
            f"no --recipe given and {source} is not a local directory written by gemoe convert; pass --recipe FILE."
        )
    return recipe_from_checkpoint(Path(source), description), f"{source}/config.json (gemoe section)"


def _precheck_recipe(recipe, description) -> None:
    """Compare the recipe with the model's structure before any weights load (the fingerprint comes later)."""
    from gemoe_cli.recipe import ModelIdentity, check_recipe_matches

    structure = ModelIdentity(
        model_type=description.model_type,
        num_moe_layers=description.num_moe_layers,
        num_experts=description.layers[0].num_experts,
        top_k=description.layers[0].top_k,
        router_fingerprint=recipe.model.router_fingerprint,
    )
    check_recipe_matches(recipe, structure, [layer.path for layer in description.layers])


def _check_image_text_prompts(inputs: BenchInputs, settings: BenchSettings, limit: int | None) -> None:
    """Reject image+text decode prompts that leave no room for `settings.gen_len` new tokens."""
    if limit is None:
        return
    for prompt in inputs.decode:
        needed = prompt.size(1) + settings.gen_len
        if needed > limit:
            raise InvalidInputError(
                f"{prompt.origin}: the prompt is {prompt.size(1)} tokens with its images, and --gen-len "
                f"{settings.gen_len} makes {needed} positions, above the model's limit of {limit}; lower --gen-len."
            )


def run_bench(
    source: str,
    *,
    recipe_path: Path | None,
    settings: BenchSettings,
    dataset: str | None,
    num_samples: int,
    seq_len: int,
    heldout_fraction: float,
    device: str,
    dtype: str,
    ignore_fingerprint: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_images: int | None = None,
    skip_bad_samples: bool = False,
) -> dict:
    """Load `source`, benchmark it against its recipe and return the JSON record; writes nothing.

    The evaluation set is the held-out part of `dataset` split as `gemoe calibrate` splits it with the same
    `num_samples`, `seq_len`, `settings.seed` and `heldout_fraction` (and, for image+text data,
    `prompt_template`, `max_images` and `skip_bad_samples`). `dataset=None` picks the built-in image set
    for vision-language models and the built-in text set otherwise. `threads` sets torch's CPU threads for
    the run (`torch.set_num_threads`) and restores the previous number afterwards.

    Raises:
        InvalidInputError: a bad argument, a missing model or data, or a position limit below the prompts.
        UnsupportedModelError: the model cannot route adaptively.
        RecipeMismatchError: the recipe describes another model.
    """
    from gemoe_cli.api import model_identity
    from gemoe_cli.calibration.pipeline import choose_dataset, read_data
    from gemoe_cli.inspection import describe_source
    from gemoe_cli.models import load_config, load_model, max_positions, resolve_device
    from gemoe_cli.recipe import check_recipe_matches
    from gemoe_cli.routing import find_moe_blocks

    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise InvalidInputError(f"--threads {threads} is invalid; use 1 or more.")
    device = resolve_device(device)
    description = describe_source(source, trust_remote_code=trust_remote_code)
    if not description.supported:
        raise UnsupportedModelError(description.reason)
    recipe, recipe_source = resolve_recipe(source, recipe_path, description)
    _precheck_recipe(recipe, description)

    config = load_config(source, trust_remote_code=trust_remote_code)
    limit = max_positions(config)
    choice = choose_dataset(config, dataset)
    if settings.metric == "exact_match" and not choice.image_text:
        raise InvalidInputError("--metric exact_match needs image+text data with answers; use nll, agreement or kl.")
    if not choice.image_text and limit is not None and settings.tokens_needed > limit:
        raise InvalidInputError(
            f"--prompt-len {settings.prompt_len} + --gen-len {settings.gen_len} = {settings.tokens_needed} positions "
            f"exceed the model's limit of {limit}; lower them."
        )
    data = read_data(
        source,
        config,
        choice,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=settings.seed,
        heldout_fraction=heldout_fraction,
        prompt_template=prompt_template,
        max_images=max_images,
        skip_bad_samples=skip_bad_samples,
        trust_remote_code=trust_remote_code,
    )
    if choice.image_text:
        inputs = build_image_text_inputs(data.fit + data.heldout, data.heldout, settings)
        _check_image_text_prompts(inputs, settings, limit)
    else:
        stream = torch.cat([data.fit.reshape(-1), data.heldout.reshape(-1)])  # (N,)
        inputs = build_inputs(stream, data.batches("heldout", settings.eval_batch_size), settings)

    if progress is not None:
        progress(f"loading {source} on {device}")
    model = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model.to(device)
    identity = model_identity(model, name_or_path=source)
    paths = [block.path for block in find_moe_blocks(model)]
    for warning in check_recipe_matches(recipe, identity, paths, ignore_fingerprint):
        logger.warning(warning)

    from gemoe_cli.bench.policies import RoutingSpec

    spec = RoutingSpec.from_recipe(recipe, recipe_source)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        record = run_benchmark(model, spec, inputs, settings, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)

    record["model"]["name_or_path"] = source
    record["data"] = {
        "dataset": choice.dataset,
        "kind": "image+text" if choice.image_text else "text",
        "num_samples": num_samples,
        "seq_len": None if choice.image_text else seq_len,
        "seed": settings.seed,
        "heldout_fraction": heldout_fraction,
        "samples_read": data.samples_read,
        "fit_blocks": data.fit_count,
        "heldout_blocks": data.heldout_count,
        "prompt_template": prompt_template if choice.image_text and Path(choice.dataset).is_dir() else None,
        "max_images": max_images,
        "bad_samples": data.bad_samples if (data.bad_samples or {}).get("skipped") else None,
    }
    record["seconds_total"] = time.perf_counter() - started
    return record
