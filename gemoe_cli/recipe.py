"""Recipe: the versioned file that sets how adaptive routing behaves on one model.

A recipe names the model it was calibrated for (`ModelIdentity`), the routing settings (`k_min`,
`k_max`, `renormalize`) and, per MoE layer, the gating-entropy thresholds. A layer of a vision-language
model may also carry thresholds per token modality (`LayerRecipe.modalities`). Recipes are stored as YAML
or JSON and validated on load and before save, so a recipe file on disk is always a valid one.

This module imports neither torch nor transformers at import time, so the CLI starts fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gemoe_cli.atomic import write_text_atomically
from gemoe_cli.errors import InvalidInputError, RecipeMismatchError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
"""The only recipe `format_version` this release reads and writes."""

Renormalize = Literal["preserve_mass", "none"]
"""Scaling of the kept experts' weights. `preserve_mass` rescales them to the weight sum of the original
top-k selection, and `none` keeps the raw router weights."""

_INFINITY_STRINGS = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def _parse_infinity_string(value: Any) -> Any:
    """Turn the JSON spellings "inf", "+inf" and "-inf" into floats, and reject any other string."""
    if not isinstance(value, str):
        return value
    parsed = _INFINITY_STRINGS.get(value.strip().lower())
    if parsed is None:
        raise ValueError(f"threshold {value!r} is not a number; use a number, -inf or inf")
    return parsed


def encode_threshold(value: float) -> float | str:
    """Return a threshold in a form standard JSON can encode: infinities become the strings "inf" and "-inf"."""
    if math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


Threshold = Annotated[float, BeforeValidator(_parse_infinity_string), Field(strict=True)]
"""A gating-entropy threshold in nats. Strict, so `true` is rejected instead of read as 1.0."""

StrictPositiveInt = Annotated[int, Field(strict=True, ge=1)]


class _RecipeSection(BaseModel):
    # `extra="forbid"` turns a misspelled field name into an error that names it.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelIdentity(_RecipeSection):
    """The model a recipe was calibrated for, compared with the target model before routing changes."""

    model_type: Annotated[str, Field(min_length=1)]
    """`config.model_type` of the Hugging Face model, for example `mixtral`."""
    num_moe_layers: StrictPositiveInt
    num_experts: StrictPositiveInt
    """`E`: routed experts per MoE layer."""
    top_k: StrictPositiveInt
    """`K`: experts per token under the model's static top-k routing."""
    router_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Lowercase hex sha256 of the router weights, as computed by `router_fingerprint`."""
    name_or_path: str | None = None
    """Hub id or local folder the model was loaded from. Informational only, and never compared."""


class RoutingSettings(_RecipeSection):
    """Settings that apply to every MoE layer of the recipe."""

    k_min: Annotated[int, Field(strict=True)] = 1
    """Minimum number of experts a token engages."""
    k_max: Annotated[int, Field(strict=True)] | None = None
    """Maximum number of experts a token engages. `None` means the model's `top_k`."""
    renormalize: Renormalize = "preserve_mass"

    def resolve_k_max(self, top_k: int) -> int:
        """Return `k_max`, or `top_k` when `k_max` is not set."""
        return self.k_max if self.k_max is not None else top_k


Modality = Literal["text", "image", "video", "audio"]
"""A token modality, as `gemoe_cli.routing.modality` names it."""


class LayerRecipe(_RecipeSection):
    """Thresholds of one MoE layer: `k_max - k_min` gating-entropy values in nats, non-decreasing."""

    thresholds: list[Threshold]
    """Thresholds for every token whose modality has no entry in `modalities`."""
    modalities: dict[Modality, list[Threshold]] | None = None
    """Thresholds for the tokens of one modality (vision-language models), each list like `thresholds`."""


class Recipe(_RecipeSection):
    """A complete recipe: model identity, routing settings and per-layer thresholds.

    Constructing a `Recipe` runs `validate_self`, so an invalid combination raises `InvalidInputError`.
    """

    format_version: Literal[1] = FORMAT_VERSION
    model: ModelIdentity
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    layers: dict[str, LayerRecipe]
    """Thresholds keyed by the module path of the MoE block, for example `model.layers.0.mlp`.
    MoE layers not listed here keep static top-k routing."""
    calibration: dict[str, Any] | None = None
    """Free-form record of how the thresholds were fitted."""
    notes: str | None = None
    checksum: str | None = None
    """SHA-256 of the recipe's other content, written on save. A mismatch on load means the file was
    edited by hand: it is still used (if valid), with a warning."""

    @property
    def per_modality(self) -> bool:
        """Whether any layer has thresholds for a token modality."""
        return any(layer.modalities for layer in self.layers.values())

    @property
    def resolved_k_max(self) -> int:
        """`routing.k_max`, or the model's `top_k` when `k_max` is not set."""
        return self.routing.resolve_k_max(self.model.top_k)

    @model_validator(mode="after")
    def _validate_after_parsing(self) -> Recipe:
        self.validate_self()
        return self

    def validate_self(self) -> None:
        """Raise `InvalidInputError` unless the routing settings and every layer's thresholds fit the model.

        Every layer is checked, and the message names the first invalid layer and how many others fail.
        """
        # NOTE: validate_thresholds lives in a module that imports torch, so the first validation imports
        # torch (a second or more) even though importing this module does not.
        from gemoe_cli.routing.policy import validate_thresholds

        self._validate_routing()

        k_min = self.routing.k_min
        k_max = self.resolved_k_max
        problems = []
        for path, layer in self.layers.items():
            lists = {f"layers[{path}].thresholds": layer.thresholds}
            for modality, values in (layer.modalities or {}).items():
                lists[f"layers[{path}].modalities[{modality}]"] = values
            for where, values in lists.items():
                try:
                    validate_thresholds(values, k_min, k_max, where=where)
                except InvalidInputError as error:
                    problems.append(str(error))
        if problems:
            message = problems[0]
            if len(problems) > 1:
                message += f" ({len(problems) - 1} more layers have invalid thresholds.)"
            raise InvalidInputError(message)

    def _validate_routing(self) -> None:
        top_k = self.model.top_k
        num_experts = self.model.num_experts
        k_min = self.routing.k_min
        k_max = self.routing.k_max

        if top_k > num_experts:
            raise InvalidInputError(
                f"model.top_k={top_k} is greater than model.num_experts={num_experts}; "
                f"copy both values from the model config."
            )
        if k_min < 1:
            raise InvalidInputError(f"routing.k_min={k_min} is invalid; set k_min to 1 or more.")
        if k_max is not None and k_max > top_k:
            raise InvalidInputError(
                f"routing.k_max={k_max} is greater than model.top_k={top_k}; "
                f"set k_max to at most {top_k}, or leave it out to use top_k."
            )
        resolved = self.resolved_k_max
        if k_min > resolved:
            k_max_text = f"routing.k_max={k_max}" if k_max is not None else f"k_max (model.top_k)={resolved}"
            raise InvalidInputError(f"routing.k_min={k_min} is greater than {k_max_text}; set k_min <= k_max.")
        if len(self.layers) > self.model.num_moe_layers:
            raise InvalidInputError(
                f"layers has {len(self.layers)} entries but model.num_moe_layers={self.model.num_moe_layers}; "
                f"remove the extra layers or fix num_moe_layers."
            )


# --- fingerprint -------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

_FINGERPRINT_TAG = b"gemoe-router-fingerprint-v2\0"


def router_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash router weights into the lowercase hex sha256 stored in `ModelIdentity.router_fingerprint`.

    Each (name, tensor) pair is hashed in the given order as: the UTF-8 name with its byte length, the
    number of dimensions and each dimension as little-endian int64, then the values rounded to bfloat16 and
    written as contiguous little-endian float32. The rounding makes the fingerprint independent of the dtype
    a checkpoint is loaded in: a float32 checkpoint loaded as float32 or bfloat16 hashes the same. Loaded as
    float16 it does not, because rounding to float16 first moves some values to the other bfloat16 neighbour.
    """
    import torch

    digest = hashlib.sha256(_FINGERPRINT_TAG)
    for name, tensor in named_weights:
        if tensor.is_meta:
            raise InvalidInputError(
                f"router weight {name!r} is on the meta device and has no values; load the weights before "
                f"computing the fingerprint."
            )
        values = tensor.detach().to(device="cpu", dtype=torch.bfloat16).to(torch.float32).contiguous()
        name_bytes = name.encode("utf-8")
        digest.update(struct.pack("<Q", len(name_bytes)))
        digest.update(name_bytes)
        digest.update(struct.pack("<Q", values.dim()))
        digest.update(struct.pack(f"<{values.dim()}q", *values.shape))
        digest.update(values.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


# --- matching a recipe against a model ----------------------------------------------------------------

_IDENTITY_FIELDS = ("model_type", "num_experts", "top_k", "num_moe_layers")


def check_recipe_matches(
    recipe: Recipe,
    identity: ModelIdentity,
    layer_paths: list[str],
    ignore_fingerprint: bool = False,
) -> list[str]:
    """Raise `RecipeMismatchError` unless `recipe` describes the model with `identity` and MoE `layer_paths`.

    Returns warnings: MoE layers that the recipe leaves out (they keep static top-k routing), and a
    fingerprint mismatch when `ignore_fingerprint` is true.
    """
    expected = recipe.model
    differences = [
        f"{field}={getattr(expected, field)!r} in the recipe but {getattr(identity, field)!r} in the model"
        for field in _IDENTITY_FIELDS
        if getattr(expected, field) != getattr(identity, field)
    ]
    if differences:
        raise RecipeMismatchError(
            f"recipe does not match the model: {', '.join(differences)}; "
            f"calibrate a recipe for this model with `gemoe calibrate`."
        )

    known_paths = set(layer_paths)
    unknown_paths = [path for path in recipe.layers if path not in known_paths]
    if unknown_paths:
        more = f" (and {len(unknown_paths) - 1} more)" if len(unknown_paths) > 1 else ""
        example = f", for example {layer_paths[0]!r}" if layer_paths else ""
        raise RecipeMismatchError(
            f"recipe layer {unknown_paths[0]!r} is not an MoE layer of the model{more}; the model has "
            f"{len(layer_paths)} MoE layers{example}; calibrate a recipe for this model with `gemoe calibrate`."
        )

    warnings = []
    if expected.router_fingerprint != identity.router_fingerprint:
        mismatch = (
            f"recipe was fitted on other router weights (router_fingerprint {expected.router_fingerprint[:12]}... "
            f"in the recipe, {identity.router_fingerprint[:12]}... in the model)"
        )
        if not ignore_fingerprint:
            raise RecipeMismatchError(
                f"{mismatch}; calibrate a recipe for these weights, or pass --ignore-fingerprint to use it anyway. "
                "A float32 checkpoint loaded with --dtype float16 also changes it; load it as float32 or bfloat16."
            )
        warnings.append(f"{mismatch}; using it anyway because the fingerprint check is off.")

    missing_paths = [path for path in layer_paths if path not in recipe.layers]
    if missing_paths:
        warnings.append(
            f"{len(missing_paths)} of {len(layer_paths)} MoE layers have no thresholds in the recipe and keep "
            f"static top-{identity.top_k} routing, starting with {missing_paths[0]!r}."
        )
    return warnings


def static_recipe(
    identity: ModelIdentity,
    layer_paths: list[str],
    k_min: int | None = None,
    k_max: int | None = None,
    renormalize: Renormalize | None = None,
) -> Recipe:
    """Build a recipe whose thresholds are all -inf, so every token engages `k_max` experts.

    With the default `k_max` (the model's `top_k`) this is static top-k routing. Arguments left at
    `None` take the `RoutingSettings` defaults.
    """
    settings = {"k_min": k_min, "k_max": k_max, "renormalize": renormalize}
    routing = RoutingSettings(**{name: value for name, value in settings.items() if value is not None})
    threshold_count = routing.resolve_k_max(identity.top_k) - routing.k_min
    layers = {path: LayerRecipe(thresholds=[-math.inf] * threshold_count) for path in layer_paths}
    return Recipe(model=identity, routing=routing, layers=layers)


# --- load and save ------------------------------------------------------------------------------------

_SUFFIX_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    file_format = _SUFFIX_FORMATS.get(suffix)
    if file_format is None:
        suffix_text = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise InvalidInputError(f"recipe file {path} has {suffix_text}; use a .yaml, .yml or .json file.")
    return file_format


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe from a .yaml, .yml or .json file.

    Every failure raises `InvalidInputError` with one line that names the file, the field and the fix.
    """
    path = Path(path)
    file_format = _file_format(path)
    text = _read_text(path)
    data = _parse_yaml(path, text) if file_format == "yaml" else _parse_json(path, text)

    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise InvalidInputError(
            f"{path}: the recipe is {kind}, not a mapping; write the fields (format_version, model, routing, "
            f"layers) at the top level."
        )
    _check_format_version(path, data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise InvalidInputError(f"{path}: {_describe_validation_error(error)}") from None
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None

    expected = _recipe_to_data(recipe)["checksum"]
    if recipe.checksum is not None and recipe.checksum != expected:
        logger.warning("%s was edited after gemoe wrote it (checksum mismatch); using its current content.", path)
    # The checksum describes the file, not the object: saving computes a fresh one.
    return recipe.model_copy(update={"checksum": None})


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Validate `recipe` and write it to a .yaml, .yml or .json file, replacing the file atomically.

    The text goes to a temporary file in the same folder, which then replaces `path`. On any failure the
    temporary file is removed and an existing file at `path` is left as it was.
    """
    write_text_atomically(Path(path), recipe_text(recipe, path), what="recipe file")


def recipe_text(recipe: Recipe, path: str | os.PathLike[str]) -> str:
    """Validate `recipe` and return the text `save_recipe` writes to `path` (YAML or JSON by its suffix)."""
    file_format = _file_format(Path(path))
    recipe.validate_self()
    return recipe_to_yaml(recipe) if file_format == "yaml" else recipe_to_json(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialize a recipe to YAML. The same recipe always gives the same text."""
    return yaml.dump(
        _recipe_to_data(recipe),
        Dumper=_RecipeDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def recipe_to_json(recipe: Recipe) -> str:
    """Serialize a recipe to JSON, writing non-finite floats as the strings "inf", "-inf" and "nan"."""
    data = _replace_non_finite_floats(_recipe_to_data(recipe))
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _recipe_to_data(recipe: Recipe) -> dict[str, Any]:
    """Dump a recipe in a stable key order.

    Top-level and section keys follow the field order of the models. Layer paths are sorted so that
    numbers compare as numbers (`layers.2` before `layers.10`), and calibration keys are sorted.
    """
    data = recipe.model_dump(mode="python", exclude_none=True, exclude={"checksum"})
    layers = data["layers"]
    data["layers"] = {path: layers[path] for path in sorted(layers, key=_natural_sort_key)}
    if "calibration" in data:
        data["calibration"] = _sort_mapping_keys(data["calibration"])
    data["checksum"] = recipe_checksum(data)
    return data


def recipe_checksum(data: dict[str, Any]) -> str:
    """Return the SHA-256 of a recipe's content (every field but `checksum`) in a canonical JSON form."""
    content = {key: value for key, value in data.items() if key != "checksum"}
    canonical = json.dumps(_replace_non_finite_floats(content), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _natural_sort_key(path: str) -> tuple[Any, ...]:
    # re.split with a capture group puts the digit runs at the odd positions, so tuples compare cleanly.
    parts = re.split(r"(\d+)", path)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts))


def _sort_mapping_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sort_mapping_keys(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_sort_mapping_keys(item) for item in value]
    return value


def _replace_non_finite_floats(value: Any) -> Any:
    # NOTE: thresholds read the strings back as floats, but inside the free-form `calibration` mapping
    # they stay strings after a JSON round trip.
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else encode_threshold(value)
    if isinstance(value, dict):
        return {key: _replace_non_finite_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_non_finite_floats(item) for item in value]
    return value


class _RecipeDumper(yaml.SafeDumper):
    """YAML dumper that writes lists of scalars on one line, for example `thresholds: [-.inf, 1.2]`."""


def _represent_list(dumper: yaml.SafeDumper, items: list[Any]) -> yaml.SequenceNode:
    all_scalars = all(item is None or isinstance(item, (bool, int, float, str)) for item in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=all_scalars)


_RecipeDumper.add_representer(list, _represent_list)


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects duplicate keys instead of keeping the last value."""


def _construct_mapping_without_duplicates(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # construct_mapping below reports the unhashable key
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep only one entry", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(
            f"recipe file {path} not found; check the path, or write a recipe with `gemoe calibrate`."
        ) from None
    except IsADirectoryError:
        raise InvalidInputError(f"recipe path {path} is a folder; pass the recipe file inside it.") from None
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"recipe file {path} is not UTF-8 text (invalid byte at offset {error.start}); save it as UTF-8."
        ) from None
    except OSError as error:
        raise InvalidInputError(
            f"cannot read recipe file {path}: {error.strerror or error}; check its permissions."
        ) from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # _RecipeLoader derives from SafeLoader
    except yaml.MarkedYAMLError as error:
        problem = error.problem or error.context or "syntax error"
        where = ""
        if error.problem_mark is not None:
            where = f" at line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1}"
        raise InvalidInputError(f"{path}: invalid YAML{where}: {problem}; fix the syntax there.") from None
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInputError(f"{path}: invalid YAML: {first_line}; fix the syntax.") from None


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}; keep only one entry")
        result[key] = value
    return result


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}; fix the syntax there."
        ) from None
    except ValueError as error:
        raise InvalidInputError(f"{path}: invalid JSON: {error}.") from None


def _check_format_version(path: Path, data: dict[str, Any]) -> None:
    # Checked before schema validation so a recipe from a newer release gets a version message instead
    # of errors about fields this release does not know.
    if "format_version" not in data:
        raise InvalidInputError(f"{path}: format_version is missing; add `format_version: {FORMAT_VERSION}`.")
    version = data["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise InvalidInputError(
            f"{path}: format_version is {version!r}, but this gemoe reads only format_version {FORMAT_VERSION}; "
            f"upgrade gemoe or write the recipe again with `gemoe calibrate`."
        )


_VALIDATION_FIXES = {
    "missing": "add the field",
    "extra_forbidden": "remove the field or fix its spelling",
    "string_pattern_mismatch": "use the 64-character lowercase hex sha256 from `router_fingerprint`",
}


def _describe_validation_error(error: ValidationError) -> str:
    """Condense a pydantic ValidationError into one line: the first error's field, message and fix."""
    errors = error.errors(include_url=False)
    first = errors[0]
    message = f"{_format_location(first['loc'])}: {first['msg']}"

    value = first.get("input")
    if first["type"] not in ("missing", "extra_forbidden") and not isinstance(value, (dict, list)):
        value_text = repr(value)
        if len(value_text) > 60:
            value_text = value_text[:57] + "..."
        message += f" (got {value_text})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    fix = _VALIDATION_FIXES.get(first["type"], "fix the value")
    return f"{message}; {fix}."


def _format_location(location: tuple[int | str, ...]) -> str:
    """Render a pydantic error location the way the recipe reference writes fields.

    `("layers", "model.layers.0.mlp", "thresholds", 1)` becomes `layers[model.layers.0.mlp].thresholds[1]`.
    """
    text = ""
    for index, part in enumerate(location):
        in_brackets = isinstance(part, int) or (index > 0 and location[index - 1] in ("layers", "calibration"))
        if in_brackets:
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "recipe"
