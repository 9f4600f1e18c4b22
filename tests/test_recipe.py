"""Tests for the recipe schema, its YAML/JSON files, fingerprints and matching against a model."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemoe_cli.atomic as atomic_module
import gemoe_cli.recipe as recipe_module
from gemoe_cli.errors import DiskFullError, InvalidInputError, RecipeMismatchError
from gemoe_cli.recipe import (
    LayerRecipe,
    ModelIdentity,
    Recipe,
    RoutingSettings,
    check_recipe_matches,
    load_recipe,
    recipe_to_json,
    recipe_to_yaml,
    router_fingerprint,
    save_recipe,
    static_recipe,
)

LAYER_PATHS = ["model.layers.0.mlp", "model.layers.1.mlp"]
FINGERPRINT = "a" * 64
OTHER_FINGERPRINT = "b" * 64


def make_identity(**changes: object) -> ModelIdentity:
    fields = {
        "model_type": "mixtral",
        "num_moe_layers": 2,
        "num_experts": 8,
        "top_k": 3,
        "router_fingerprint": FINGERPRINT,
        "name_or_path": "tiny-mixtral",
    }
    fields.update(changes)
    return ModelIdentity(**fields)


def make_recipe() -> Recipe:
    """A valid recipe with k_min=1, k_max=top_k=3 and finite and infinite thresholds."""
    return Recipe(
        model=make_identity(),
        routing=RoutingSettings(k_min=1),
        layers={
            LAYER_PATHS[0]: LayerRecipe(thresholds=[-math.inf, 1.5]),
            LAYER_PATHS[1]: LayerRecipe(thresholds=[0.1 + 0.2, math.inf]),
        },
        calibration={"target_sparsity": 0.3, "tokens": 4096},
        notes="fitted on a tiny model",
    )


def recipe_data(**changes: object) -> dict:
    """The dict form of `make_recipe()`, as a YAML or JSON file would hold it."""
    data = {
        "format_version": 1,
        "model": make_identity().model_dump(),
        "routing": {"k_min": 1, "renormalize": "preserve_mass"},
        "layers": {
            LAYER_PATHS[0]: {"thresholds": [-math.inf, 1.5]},
            LAYER_PATHS[1]: {"thresholds": [0.5, math.inf]},
        },
    }
    data.update(changes)
    return data


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- schema ------------------------------------------------------------------------------------------


def test_routing_defaults() -> None:
    routing = RoutingSettings()

    assert routing.k_min == 1
    assert routing.k_max is None
    assert routing.renormalize == "preserve_mass"


def test_resolved_k_max_defaults_to_top_k() -> None:
    recipe = make_recipe()
    assert recipe.resolved_k_max == 3

    limited = Recipe(
        model=make_identity(), routing=RoutingSettings(k_max=2), layers={LAYER_PATHS[0]: {"thresholds": [0.5]}}
    )
    assert limited.resolved_k_max == 2


@pytest.mark.parametrize(
    ("routing", "thresholds", "match"),
    [
        ({}, [1.0, 0.5], r"layers\[model\.layers\.0\.mlp\]\.thresholds must be non-decreasing"),
        ({"k_min": 3, "k_max": 2}, [], r"routing\.k_min=3 is greater than routing\.k_max=2"),
        ({"k_min": 4}, [], r"routing\.k_min=4 is greater than k_max \(model\.top_k\)=3"),
        ({"k_max": 4}, [0.1, 0.2, 0.3], r"routing\.k_max=4 is greater than model\.top_k=3"),
        ({}, [0.5], r"layers\[model\.layers\.0\.mlp\]\.thresholds has 1 values but k_max - k_min = 2"),
        ({}, [0.5, math.nan], r"layers\[model\.layers\.0\.mlp\]\.thresholds\[1\] is NaN"),
        ({"k_min": 0}, [0.1, 0.2, 0.3], r"routing\.k_min=0 is invalid; set k_min to 1 or more"),
    ],
)
def test_recipe_rejects_invalid_routing(routing: dict, thresholds: list[float], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        Recipe(
            model=make_identity(),
            routing=RoutingSettings(**routing),
            layers={LAYER_PATHS[0]: {"thresholds": thresholds}},
        )


def test_recipe_rejects_top_k_above_num_experts() -> None:
    with pytest.raises(InvalidInputError, match=r"model\.top_k=9 is greater than model\.num_experts=8"):
        Recipe(model=make_identity(top_k=9), layers={})


def test_recipe_rejects_more_layers_than_model() -> None:
    layers = {f"model.layers.{index}.mlp": {"thresholds": [0.1, 0.2]} for index in range(3)}
    with pytest.raises(InvalidInputError, match=r"layers has 3 entries but model\.num_moe_layers=2"):
        Recipe(model=make_identity(), layers=layers)


def test_recipe_counts_other_invalid_layers() -> None:
    layers = {path: {"thresholds": [0.5]} for path in LAYER_PATHS}
    with pytest.raises(InvalidInputError, match=r"model\.layers\.0\.mlp.*\(1 more layers have invalid thresholds\.\)"):
        Recipe(model=make_identity(), layers=layers)


def test_threshold_rejects_bool_and_words() -> None:
    with pytest.raises(ValueError, match="valid number"):
        LayerRecipe(thresholds=[True])
    with pytest.raises(ValueError, match="threshold 'big' is not a number"):
        LayerRecipe(thresholds=["big"])


def test_threshold_accepts_infinity_strings() -> None:
    layer = LayerRecipe(thresholds=["-inf", "+inf", " INF ", 2])

    assert layer.thresholds == [-math.inf, math.inf, math.inf, 2.0]


def test_model_identity_rejects_bad_fingerprint() -> None:
    with pytest.raises(ValueError, match="router_fingerprint"):
        make_identity(router_fingerprint="ABC")


# --- YAML and JSON files -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    recipe = make_recipe()
    path = tmp_path / f"recipe{suffix}"

    save_recipe(recipe, path)
    loaded = load_recipe(path)

    assert loaded == recipe
    assert loaded.layers[LAYER_PATHS[0]].thresholds[0] == -math.inf
    assert loaded.layers[LAYER_PATHS[1]].thresholds[1] == math.inf
    assert loaded.layers[LAYER_PATHS[1]].thresholds[0] == 0.1 + 0.2


def test_round_trip_renormalize_none_and_k_max(tmp_path: Path) -> None:
    recipe = Recipe(
        model=make_identity(),
        routing=RoutingSettings(k_min=2, k_max=2, renormalize="none"),
        layers={LAYER_PATHS[0]: {"thresholds": []}},
    )
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"recipe{suffix}"
        save_recipe(recipe, path)
        assert load_recipe(path) == recipe


def test_yaml_writes_dot_inf(tmp_path: Path) -> None:
    text = recipe_to_yaml(make_recipe())

    assert "thresholds: [-.inf, 1.5]" in text
    assert "thresholds: [0.30000000000000004, .inf]" in text


def test_yaml_reads_dot_inf(tmp_path: Path) -> None:
    text = recipe_to_yaml(make_recipe()).replace("[-.inf, 1.5]", "[-.Inf, 1.5]").replace(".inf]", ".INF]")
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")

    loaded = load_recipe(path)

    assert loaded.layers[LAYER_PATHS[0]].thresholds == [-math.inf, 1.5]
    assert loaded.layers[LAYER_PATHS[1]].thresholds[1] == math.inf


def test_json_writes_infinity_strings(tmp_path: Path) -> None:
    text = recipe_to_json(make_recipe())

    assert "Infinity" not in text
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert data["layers"][LAYER_PATHS[0]]["thresholds"] == ["-inf", 1.5]
    assert data["layers"][LAYER_PATHS[1]]["thresholds"][1] == "inf"


def test_json_reads_float_infinities(tmp_path: Path) -> None:
    text = recipe_to_json(make_recipe()).replace('"-inf"', "-Infinity").replace('"inf"', "Infinity")
    path = tmp_path / "recipe.json"
    path.write_text(text, encoding="utf-8")

    loaded = load_recipe(path)

    assert loaded.layers[LAYER_PATHS[0]].thresholds[0] == -math.inf
    assert loaded.layers[LAYER_PATHS[1]].thresholds[1] == math.inf


def test_yaml_bytes_identical(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    second = tmp_path / "second.yaml"

    save_recipe(make_recipe(), first)
    save_recipe(make_recipe(), second)

    assert first.read_bytes() == second.read_bytes()


def test_yaml_layer_order_is_stable() -> None:
    identity = make_identity(num_moe_layers=12)
    paths = [f"model.layers.{index}.mlp" for index in (10, 2, 11, 0, 1)]
    shuffled = static_recipe(identity, paths)
    ordered = static_recipe(identity, sorted(paths, key=lambda path: int(path.split(".")[2])))

    text = recipe_to_yaml(shuffled)

    assert text == recipe_to_yaml(ordered)
    positions = [text.index(f"model.layers.{index}.mlp:") for index in (0, 1, 2, 10, 11)]
    assert positions == sorted(positions)


def test_yaml_sorts_calibration_keys() -> None:
    reversed_keys = make_recipe().model_copy(update={"calibration": {"b": 1, "a": {"y": 2, "x": 3}}})
    sorted_keys = make_recipe().model_copy(update={"calibration": {"a": {"x": 3, "y": 2}, "b": 1}})

    assert recipe_to_yaml(reversed_keys) == recipe_to_yaml(sorted_keys)


def test_yaml_omits_unset_optionals() -> None:
    recipe = Recipe(model=make_identity(name_or_path=None), layers={})
    text = recipe_to_yaml(recipe)

    assert "null" not in text
    assert "k_max" not in text
    assert "notes" not in text


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 2}, r"format_version is 2, but this gemoe reads only format_version 1"),
        ({"format_version": "1"}, r"format_version is '1'"),
        (
            {"thresholds": [0.1]},
            r": thresholds: Extra inputs are not permitted; remove the field or fix its spelling\.$",
        ),
        ({"routing": {"k_mni": 2}}, r": routing\.k_mni: Extra inputs are not permitted"),
        (
            {"routing": {"renormalize": "sum"}},
            r"routing\.renormalize: Input should be 'preserve_mass' or 'none' \(got 'sum'\)",
        ),
        (
            {"layers": {LAYER_PATHS[0]: {"thresholds": [0.1, "x"]}}},
            r"layers\[model\.layers\.0\.mlp\]\.thresholds\[1\]: ",
        ),
        ({"layers": {LAYER_PATHS[0]: {"thresholds": [0.9, 0.1]}}}, r"thresholds must be non-decreasing"),
        (
            {"model": {"model_type": "mixtral"}},
            r"model\.num_moe_layers: Field required \(and 3 more\); add the field\.",
        ),
    ],
)
def test_load_rejects_invalid_recipe(tmp_path: Path, changes: dict, match: str) -> None:
    path = write_yaml(tmp_path / "recipe.yaml", recipe_data(**changes))

    with pytest.raises(InvalidInputError, match=match) as raised:
        load_recipe(path)

    message = str(raised.value)
    assert message.startswith(str(path))
    assert "\n" not in message


def test_load_rejects_missing_format_version(tmp_path: Path) -> None:
    data = recipe_data()
    del data["format_version"]
    path = write_yaml(tmp_path / "recipe.yaml", data)

    with pytest.raises(InvalidInputError, match=r"format_version is missing; add `format_version: 1`"):
        load_recipe(path)


def test_load_rejects_bad_suffix(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text("format_version = 1\n", encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"has suffix '\.toml'; use a \.yaml, \.yml or \.json file"):
        load_recipe(path)
    with pytest.raises(InvalidInputError, match=r"has no suffix"):
        load_recipe(tmp_path / "recipe")


def test_load_rejects_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(InvalidInputError, match=r"recipe file .*absent\.yaml not found; check the path"):
        load_recipe(path)


def test_load_rejects_folder(tmp_path: Path) -> None:
    folder = tmp_path / "recipes.yaml"
    folder.mkdir()

    with pytest.raises(InvalidInputError, match=r"is a folder"):
        load_recipe(folder)


def test_load_rejects_truncated_yaml(tmp_path: Path) -> None:
    text = recipe_to_yaml(make_recipe())
    cut = text.index("thresholds: [") + len("thresholds: [-.inf,")
    path = tmp_path / "recipe.yaml"
    path.write_text(text[:cut], encoding="utf-8")

    with pytest.raises(
        InvalidInputError, match=r"recipe\.yaml: invalid YAML at line \d+, column \d+: .*; fix the syntax"
    ):
        load_recipe(path)


def test_load_rejects_truncated_json(tmp_path: Path) -> None:
    text = recipe_to_json(make_recipe())
    path = tmp_path / "recipe.json"
    path.write_text(text[: len(text) // 2], encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"recipe\.json: invalid JSON at line \d+, column \d+"):
        load_recipe(path)


@pytest.mark.parametrize(("text", "kind"), [("", "empty"), ("- 1\n- 2\n", "a list"), ("just text\n", "a str")])
def test_load_rejects_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(InvalidInputError, match=f"the recipe is {kind}, not a mapping"):
        load_recipe(path)


def test_load_rejects_duplicate_keys(tmp_path: Path) -> None:
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(recipe_to_yaml(make_recipe()) + "notes: again\n", encoding="utf-8")
    json_path = tmp_path / "recipe.json"
    json_path.write_text('{"format_version": 1, "format_version": 1}', encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"invalid YAML at line \d+, column 1: duplicate key 'notes'"):
        load_recipe(yaml_path)
    with pytest.raises(InvalidInputError, match=r"invalid JSON: duplicate key 'format_version'"):
        load_recipe(json_path)


def test_load_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"notes: \xff\n")

    with pytest.raises(InvalidInputError, match=r"is not UTF-8 text"):
        load_recipe(path)


# --- atomic save -------------------------------------------------------------------------------------


def leftover_temporary_files(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_save_keeps_old_file_when_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe(), path)
    old_bytes = path.read_bytes()

    def write_half_then_fail(handle, content: bytes) -> None:
        handle.write(content[: len(content) // 2])
        handle.flush()
        raise RuntimeError("disk unplugged mid-write")

    monkeypatch.setattr(atomic_module, "_write_content", write_half_then_fail)
    changed = make_recipe().model_copy(update={"notes": "a different recipe"})

    with pytest.raises(RuntimeError, match="disk unplugged mid-write"):
        save_recipe(changed, path)

    assert path.read_bytes() == old_bytes
    assert leftover_temporary_files(tmp_path) == []


def test_save_keeps_old_file_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recipe.json"
    save_recipe(make_recipe(), path)
    old_bytes = path.read_bytes()

    def fail_replace(source, destination) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(recipe_module.os, "replace", fail_replace)

    with pytest.raises(InvalidInputError, match=r"cannot write recipe file .*recipe\.json: Permission denied"):
        save_recipe(make_recipe().model_copy(update={"notes": "new"}), path)

    assert path.read_bytes() == old_bytes
    assert leftover_temporary_files(tmp_path) == []


def test_save_failure_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(handle, content: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_module, "_write_content", fail)

    with pytest.raises(DiskFullError, match=r"no space left on device .*; free space on that file system"):
        save_recipe(make_recipe(), tmp_path / "recipe.yaml")

    assert list(tmp_path.iterdir()) == []


def test_save_rejects_invalid_recipe(tmp_path: Path) -> None:
    recipe = make_recipe()
    recipe.layers[LAYER_PATHS[0]].thresholds = [2.0, 1.0]  # assignment skips validation
    path = tmp_path / "recipe.yaml"

    with pytest.raises(InvalidInputError, match=r"must be non-decreasing"):
        save_recipe(recipe, path)

    assert not path.exists()


def test_save_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"folder .*absent does not exist; create it first"):
        save_recipe(make_recipe(), tmp_path / "absent" / "recipe.yaml")


def test_save_rejects_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"has suffix '\.txt'"):
        save_recipe(make_recipe(), tmp_path / "recipe.txt")


# --- fingerprint -------------------------------------------------------------------------------------


def router_weights() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(f"{path}.gate.weight", torch.randn(8, 16, generator=generator)) for path in LAYER_PATHS]


def test_fingerprint_is_stable() -> None:
    first = router_fingerprint(router_weights())
    second = router_fingerprint(router_weights())

    assert first == second
    assert len(first) == 64
    make_identity(router_fingerprint=first)  # accepted by the schema pattern


def test_fingerprint_changes_with_one_value() -> None:
    weights = router_weights()
    before = router_fingerprint(weights)

    weights[1][1][3, 5] += 0.05  # above bfloat16 precision, which the fingerprint hashes at

    assert router_fingerprint(weights) != before


def test_fingerprint_changes_with_name_order_and_shape() -> None:
    weights = router_weights()
    before = router_fingerprint(weights)

    renamed = [("other.weight", weights[0][1]), weights[1]]
    reordered = [weights[1], weights[0]]
    reshaped = [(weights[0][0], weights[0][1].reshape(16, 8)), weights[1]]

    assert router_fingerprint(renamed) != before
    assert router_fingerprint(reordered) != before
    assert router_fingerprint(reshaped) != before


def test_fingerprint_ignores_dtype_and_layout() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    as_float = weight.float()
    transposed_back = as_float.t().contiguous().t()  # same values, non-contiguous strides

    assert router_fingerprint([("w", weight)]) == router_fingerprint([("w", as_float)])
    assert router_fingerprint([("w", transposed_back)]) == router_fingerprint([("w", as_float)])


def test_fingerprint_same_for_float32_and_bfloat16_loads() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))  # float32, not bfloat16-exact

    assert router_fingerprint([("w", weight)]) == router_fingerprint([("w", weight.to(torch.bfloat16))])


def test_model_identity_same_in_bfloat16() -> None:
    from gemoe_cli.api import model_identity
    from tests import tiny_models

    model = tiny_models.build("mixtral")
    float32 = model_identity(model)

    assert model_identity(model.to(torch.bfloat16)) == float32


def test_fingerprint_encoding() -> None:
    expected = hashlib.sha256(b"gemoe-router-fingerprint-v2\0")
    expected.update(struct.pack("<Q", 1) + b"w")
    expected.update(struct.pack("<Q", 2) + struct.pack("<2q", 1, 2))
    expected.update(struct.pack("<2f", 1.0, -2.5))

    assert router_fingerprint([("w", torch.tensor([[1.0, -2.5]]))]) == expected.hexdigest()


def test_fingerprint_rejects_meta_tensor() -> None:
    with pytest.raises(InvalidInputError, match=r"router weight 'w' is on the meta device"):
        router_fingerprint([("w", torch.empty(2, 2, device="meta"))])


def test_module_imports_without_torch() -> None:
    code = "import sys, gemoe_cli.recipe; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=False)

    assert result.returncode == 0


# --- matching a recipe against a model ---------------------------------------------------------------


def test_check_matches_returns_no_warnings() -> None:
    assert check_recipe_matches(make_recipe(), make_identity(), LAYER_PATHS) == []


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "qwen2_moe"}, r"model_type='mixtral' in the recipe but 'qwen2_moe' in the model"),
        ({"num_experts": 16}, r"num_experts=8 in the recipe but 16 in the model"),
        ({"top_k": 2}, r"top_k=3 in the recipe but 2 in the model"),
        ({"num_moe_layers": 4}, r"num_moe_layers=2 in the recipe but 4 in the model"),
    ],
)
def test_check_rejects_other_model(changes: dict, match: str) -> None:
    with pytest.raises(RecipeMismatchError, match=match) as raised:
        check_recipe_matches(make_recipe(), make_identity(**changes), LAYER_PATHS)

    assert "calibrate a recipe for this model" in str(raised.value)


def test_check_lists_all_identity_differences() -> None:
    with pytest.raises(RecipeMismatchError, match=r"num_experts=8 .* top_k=3 in the recipe but 2"):
        check_recipe_matches(make_recipe(), make_identity(num_experts=16, top_k=2), LAYER_PATHS)


def test_check_rejects_unknown_layer() -> None:
    model_paths = ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]

    with pytest.raises(
        RecipeMismatchError,
        match=r"recipe layer 'model\.layers\.0\.mlp' is not an MoE layer of the model \(and 1 more\); "
        r"the model has 2 MoE layers, for example 'model\.layers\.0\.block_sparse_moe'",
    ):
        check_recipe_matches(make_recipe(), make_identity(), model_paths)


def test_check_rejects_other_fingerprint() -> None:
    identity = make_identity(router_fingerprint=OTHER_FINGERPRINT)

    with pytest.raises(RecipeMismatchError, match=r"fitted on other router weights .*--ignore-fingerprint"):
        check_recipe_matches(make_recipe(), identity, LAYER_PATHS)


def test_check_ignore_fingerprint_warns() -> None:
    identity = make_identity(router_fingerprint=OTHER_FINGERPRINT)

    warnings = check_recipe_matches(make_recipe(), identity, LAYER_PATHS, ignore_fingerprint=True)

    assert len(warnings) == 1
    assert "fitted on other router weights" in warnings[0]


def test_check_warns_about_missing_layers() -> None:
    identity = make_identity(num_moe_layers=3)
    recipe = static_recipe(identity, LAYER_PATHS[:1])
    model_paths = [*LAYER_PATHS, "model.layers.2.mlp"]

    warnings = check_recipe_matches(recipe, identity, model_paths)

    assert len(warnings) == 1
    assert "2 of 3 MoE layers have no thresholds" in warnings[0]
    assert "static top-3 routing, starting with 'model.layers.1.mlp'" in warnings[0]


# --- static recipe -----------------------------------------------------------------------------------


def test_static_recipe_defaults() -> None:
    recipe = static_recipe(make_identity(), LAYER_PATHS)

    assert recipe.routing == RoutingSettings()
    assert list(recipe.layers) == LAYER_PATHS
    for layer in recipe.layers.values():
        assert layer.thresholds == [-math.inf, -math.inf]


def test_static_recipe_with_settings() -> None:
    recipe = static_recipe(make_identity(), LAYER_PATHS, k_min=2, k_max=2, renormalize="none")

    assert recipe.routing.k_min == 2
    assert recipe.routing.k_max == 2
    assert recipe.routing.renormalize == "none"
    assert recipe.layers[LAYER_PATHS[0]].thresholds == []


def test_static_recipe_rejects_k_min_above_top_k() -> None:
    with pytest.raises(InvalidInputError, match=r"routing\.k_min=5 is greater than"):
        static_recipe(make_identity(), LAYER_PATHS, k_min=5)


# --- documentation -----------------------------------------------------------------------------------


def test_docs_example_is_saved_form(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipe.md").read_text(encoding="utf-8")
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example, encoding="utf-8")

    recipe = load_recipe(path)

    assert recipe.resolved_k_max == 4
    assert recipe.layers["model.layers.1.mlp"].thresholds == [-math.inf, 1.1, math.inf]
    assert recipe_to_yaml(recipe) == example


def test_hand_edited_recipe_loads_with_warning(tmp_path, caplog):
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe(), path)
    text = path.read_text()
    edited = text.replace("1.5", "1.25", 1)
    assert edited != text
    path.write_text(edited)

    with caplog.at_level("WARNING"):
        loaded = load_recipe(path)

    assert "edited after gemoe wrote it" in caplog.text
    assert loaded.checksum is None


def test_unedited_recipe_loads_without_warning(tmp_path, caplog):
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe(), path)

    with caplog.at_level("WARNING"):
        load_recipe(path)

    assert "checksum" not in caplog.text


def test_truncated_recipe_rejected(tmp_path):
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe(), path)
    text = path.read_text()
    path.write_text(text[: len(text) // 3])

    with pytest.raises(InvalidInputError, match="recipe.yaml"):
        load_recipe(path)


# --- thresholds per token modality ----------------------------------------------------------------------


def make_modality_recipe() -> Recipe:
    recipe = make_recipe()
    layers = dict(recipe.layers)
    layers[LAYER_PATHS[0]] = LayerRecipe(
        thresholds=[-math.inf, -math.inf], modalities={"image": [0.5, 1.5], "text": [0.2, math.inf]}
    )
    return recipe.model_copy(update={"layers": layers})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_modality_thresholds_round_trip(tmp_path: Path, suffix: str) -> None:
    recipe = make_modality_recipe()
    path = tmp_path / f"recipe{suffix}"

    save_recipe(recipe, path)
    loaded = load_recipe(path)

    assert loaded.per_modality
    assert loaded.layers[LAYER_PATHS[0]].modalities == {"image": [0.5, 1.5], "text": [0.2, math.inf]}
    assert loaded.layers[LAYER_PATHS[1]].modalities is None
    assert not make_recipe().per_modality


def test_modality_thresholds_validated_like_thresholds() -> None:
    with pytest.raises(InvalidInputError, match=r"layers\[model.layers.0.mlp\].modalities\[image\] has 1 values"):
        Recipe(
            model=make_identity(),
            layers={LAYER_PATHS[0]: LayerRecipe(thresholds=[0.0, 1.0], modalities={"image": [0.5]})},
        )
    with pytest.raises(InvalidInputError, match=r"modalities\[text\] must be non-decreasing"):
        Recipe(
            model=make_identity(),
            layers={LAYER_PATHS[0]: LayerRecipe(thresholds=[0.0, 1.0], modalities={"text": [1.0, 0.5]})},
        )


def test_unknown_modality_rejected_on_load(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    text = recipe_to_yaml(make_modality_recipe()).replace("image:", "pixels:")
    path.write_text(text, encoding="utf-8")

    with pytest.raises(InvalidInputError, match=r"modalities.pixels"):
        load_recipe(path)
