"""`gemoe export onnx` end to end through the CLI, and its errors on bad input."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from gemoe_cli.api import model_identity
from gemoe_cli.cli.app import app
from gemoe_cli.convert import convert
from gemoe_cli.export import ops
from gemoe_cli.recipe import LayerRecipe, Recipe, RoutingSettings, save_recipe, static_recipe
from tests import tiny_models
from tests.export.conftest import quantile_routing
from tests.write_faults import FaultyDisk, leftovers, snapshot

runner = CliRunner()


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """A saved tiny olmoe with tokenizer, a recipe that drops experts, and its converted checkpoint."""
    root = tmp_path_factory.mktemp("olmoe-cli")
    model = tiny_models.build("olmoe")
    source = tiny_models.save_with_tokenizer(model, root / "source")
    routing = quantile_routing(model)
    layers = {path: LayerRecipe(thresholds=values) for path, values in routing.thresholds.items()}
    recipe = Recipe(model=model_identity(model, source), routing=RoutingSettings(), layers=layers)
    recipe_file = root / "recipe.yaml"
    save_recipe(recipe, recipe_file)
    converted = convert(source, recipe, root / "converted")
    return {"source": source, "recipe": recipe_file, "converted": str(converted), "root": root}


def test_export_help_names_format_and_body():
    result = runner.invoke(app, ["export", "--help"])

    assert result.exit_code == 0
    assert "FORMAT" in result.stdout
    assert "--body" in result.stdout
    assert "--keep-failed" in result.stdout


def test_export_converted_checkpoint(olmoe, tmp_path):
    output = tmp_path / "onnx"

    result = runner.invoke(app, ["export", "onnx", olmoe["converted"], "-o", str(output)])

    assert result.exit_code == 0, result.output
    assert "✓ logits: max abs diff" in result.stderr
    assert "✓ expert_activations: max abs diff 0.000e+00" in result.stderr
    assert f"written to {output}" in result.stderr
    assert {"model.onnx", "gemoe_onnx.json", "tokenizer.json"} <= {path.name for path in output.iterdir()}
    metadata = json.loads((output / "gemoe_onnx.json").read_text())
    assert metadata["body"] == "portable"
    assert metadata["validation"]["passed"] is True
    assert metadata["custom_ops"][0]["overloads"] == ["softmax-preserve_mass"]
    assert metadata["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert metadata["outputs"][-1] == "expert_activations"
    assert metadata["opset_imports"] == {"": 18, "ai.gemoe": 1}
    assert len(ops.custom_nodes(onnx.load(output / "model.onnx"))) == 2


def test_export_model_with_recipe_ort_body(olmoe, tmp_path):
    output = tmp_path / "onnx-ort"
    arguments = ["--recipe", str(olmoe["recipe"]), "--body", "ort", "--no-activation-counts", "-o", str(output)]

    result = runner.invoke(app, ["export", "onnx", olmoe["source"], *arguments])

    assert result.exit_code == 0, result.output
    assert "expert_activations" not in result.stderr
    metadata = json.loads((output / "gemoe_onnx.json").read_text())
    assert metadata["body"] == "ort"
    assert metadata["opset_imports"]["com.microsoft"] == 1
    assert metadata["validation"]["passed"] is True
    assert "expert_activations" not in metadata["outputs"]


def test_validation_over_atol_leaves_no_directory(olmoe, tmp_path):
    output = tmp_path / "onnx"

    result = runner.invoke(
        app, ["export", "onnx", olmoe["converted"], "--body", "ort", "--atol", "1e-12", "-o", str(output)]
    )

    assert result.exit_code == 3
    assert "✗ logits" in result.stderr
    assert "ONNX validation failed against PyTorch at --atol 1e-12" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_keep_failed_keeps_files(olmoe, tmp_path):
    output = tmp_path / "onnx"

    result = runner.invoke(
        app,
        ["export", "onnx", olmoe["converted"], "--body", "ort", "--atol", "1e-12", "--keep-failed", "-o", str(output)],
    )

    assert result.exit_code == 3
    failed_directory = tmp_path / "onnx.failed"
    assert f"kept in {failed_directory}" in result.stderr
    assert not output.exists()
    assert (failed_directory / "model.onnx").is_file()
    assert json.loads((failed_directory / "gemoe_onnx.json").read_text())["validation"]["passed"] is False


def test_missing_recipe_rejected(olmoe, tmp_path):
    result = runner.invoke(app, ["export", "onnx", olmoe["source"], "-o", str(tmp_path / "onnx")])

    assert result.exit_code == 2
    assert "is not a converted checkpoint" in result.stderr
    assert "pass --recipe" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_recipe_file_rejected(olmoe, tmp_path):
    result = runner.invoke(
        app, ["export", "onnx", olmoe["source"], "--recipe", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")]
    )

    assert result.exit_code == 2
    assert (
        f"recipe file {tmp_path / 'none.yaml'} not found; check the path, or write a recipe with `gemoe calibrate`."
        in result.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_existing_output_rejected(olmoe, tmp_path):
    output = tmp_path / "onnx"
    output.mkdir()

    result = runner.invoke(app, ["export", "onnx", olmoe["converted"], "-o", str(output)])

    assert result.exit_code == 2
    assert f"{output} already exists; choose another path or pass --force to replace it." in result.stderr
    assert list(output.iterdir()) == []


def test_unwritable_output_rejected(olmoe, tmp_path):
    output = tmp_path / "missing-folder" / "onnx"

    result = runner.invoke(app, ["export", "onnx", olmoe["converted"], "-o", str(output)])

    assert result.exit_code == 2
    assert f"folder {tmp_path / 'missing-folder'} does not exist; create it first." in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_rejected(olmoe, tmp_path):
    result = runner.invoke(app, ["export", "tflite", olmoe["converted"], "-o", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "tflite" in result.stderr


@pytest.mark.parametrize("atol", ["0", "-1", "nan"])
def test_invalid_atol_rejected(olmoe, tmp_path, atol):
    result = runner.invoke(app, ["export", "onnx", olmoe["converted"], "--atol", atol, "-o", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "--atol" in result.stderr


def test_unsupported_family_for_ort_body(tmp_path):
    model = tiny_models.build("gpt_oss")
    source = tiny_models.save_with_tokenizer(model, tmp_path / "gpt-oss")
    recipe = static_recipe(model_identity(model, source), [])
    save_recipe(recipe, tmp_path / "static.yaml")
    output = tmp_path / "onnx"

    result = runner.invoke(
        app, ["export", "onnx", source, "--recipe", str(tmp_path / "static.yaml"), "--body", "ort", "-o", str(output)]
    )

    assert result.exit_code == 2
    assert "--body ort needs SwiGLU experts" in result.stderr
    assert not output.exists()


@pytest.mark.parametrize("model_type", ["phimoe", "switch_transformers"])
def test_unsupported_family_rejected(olmoe, tmp_path, model_type):
    tiny_models.build(model_type).save_pretrained(tmp_path / model_type)
    output = tmp_path / "onnx"

    result = runner.invoke(
        app, ["export", "onnx", str(tmp_path / model_type), "--recipe", str(olmoe["recipe"]), "-o", str(output)]
    )

    assert result.exit_code == 2
    assert f"error: model type '{model_type}' is not supported: " in result.stderr
    assert "use a model of a supported family (`gemoe inspect --list-families` lists them)." in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / model_type]


# --- faults while the ONNX directory is written ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "occurrence"),
    [("model.onnx", 1), ("tokenizer_config.json", 1), ("gemoe_onnx.json", 2)],
    ids=["model", "tokenizer", "metadata-after-validation"],
)
def test_full_disk_keeps_previous_export(olmoe, tmp_path, monkeypatch, name, occurrence):
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "onnx"
    output.mkdir()
    (output / "model.onnx").write_bytes(b"previous model")
    (output / "gemoe_onnx.json").write_text('{"previous": true}')
    before = snapshot(output)
    # The disk fills 200 bytes into the file; gemoe_onnx.json is written again with the validation results.
    faulty = FaultyDisk(folder, 200, file=name, occurrence=occurrence).install(monkeypatch)

    result = runner.invoke(app, ["export", "onnx", olmoe["converted"], "-o", str(output), "--force"])

    assert faulty.failed == [name]
    assert result.exit_code == 3, result.output
    assert (
        f"error: cannot write output directory {output}: no space left on device (the disk or the quota is "
        "full); free space on that file system or choose another output path." in result.stderr
    )
    assert snapshot(output) == before
    assert leftovers(folder, {"onnx"}) == []


def test_output_over_converted_source_rejected(olmoe, tmp_path):
    converted = olmoe["converted"]
    before = snapshot(converted)

    for output in (converted, f"{converted}/.."):
        result = runner.invoke(app, ["export", "onnx", converted, "-o", output, "--force"])

        assert result.exit_code == 2, result.output
        assert f"output directory {output} " in result.stderr
        assert f"the model folder {converted}" in result.stderr
    assert snapshot(converted) == before


def test_output_containing_recipe_rejected(olmoe, tmp_path):
    output = tmp_path / "onnx"
    output.mkdir()
    recipe = output / "recipe.yaml"
    recipe.write_bytes(olmoe["recipe"].read_bytes())

    result = runner.invoke(
        app, ["export", "onnx", olmoe["source"], "--recipe", str(recipe), "-o", str(output), "--force"]
    )

    assert result.exit_code == 2, result.output
    assert f"output directory {output} contains the recipe file {recipe}" in result.stderr
    assert "choose an output directory that does not contain it." in result.stderr
    assert [path.name for path in output.iterdir()] == ["recipe.yaml"]


def test_source_without_tokenizer_warns(olmoe, tmp_path):
    tiny_models.build("olmoe").save_pretrained(tmp_path / "source")
    output = tmp_path / "onnx"

    result = runner.invoke(
        app,
        [
            "export",
            "onnx",
            str(tmp_path / "source"),
            "--recipe",
            str(olmoe["recipe"]),
            "-o",
            str(output),
            "--no-validate",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "no tokenizer saved with the ONNX model" in result.stderr
    written = {path.name for path in output.iterdir()}
    assert not written & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}
    assert json.loads((output / "gemoe_onnx.json").read_text())["tokenizer"] is False
