import json

import pytest
from typer.testing import CliRunner

from gemoe_cli.cli.app import app
from gemoe_cli.inspection import describe_model
from tests import tiny_models

runner = CliRunner()


def _save_config(model_type, tmp_path):
    config = tiny_models.FAMILIES[model_type].make_config()
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _from_layers(path):
    return path[path.index("layers.") :] if "layers." in path else path


def _invoke(*args):
    return runner.invoke(app, ["inspect", *args])


@pytest.mark.parametrize("model_type", sorted(tiny_models.FAMILIES))
def test_inspect_json_matches_model(model_type, tmp_path):
    spec = tiny_models.FAMILIES[model_type]
    expected = describe_model(tiny_models.build(model_type)) if spec.expected_supported else None

    result = _invoke(_save_config(model_type, tmp_path), "--json")

    report = json.loads(result.stdout)
    assert report["supported"] is spec.expected_supported, report["reason"]
    assert result.exit_code == (0 if spec.expected_supported else 2)
    if spec.expected_supported:
        # Vision-language entries of the zoo build only the text stack, so compare paths from "layers." on.
        assert report["num_moe_layers"] >= expected.num_moe_layers >= 1
        reported = {_from_layers(layer["path"]) for layer in report["layers"]}
        assert {_from_layers(layer.path) for layer in expected.layers} <= reported
        assert report["layers"][0]["num_experts"] == expected.layers[0].num_experts
        assert report["layers"][0]["top_k"] == spec.default_top_k
    else:
        assert "not supported" in report["reason"] or "no MoE layer" in report["reason"]


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_inspect_text_output(model_type, tmp_path):
    spec = tiny_models.FAMILIES[model_type]

    result = _invoke(_save_config(model_type, tmp_path))

    if spec.expected_supported:
        assert result.exit_code == 0
        assert "supported" in result.stdout
        assert "MoE layers" in result.stdout
    else:
        assert result.exit_code == 2
        assert "not supported" in result.stdout


def test_inspect_reports_selection_bias_and_scoring(tmp_path):
    report = json.loads(_invoke(_save_config("deepseek_v3", tmp_path), "--json").stdout)

    layer = report["layers"][0]
    assert layer["scoring"] == "sigmoid"
    assert layer["selection_bias"] is True
    assert layer["shared_experts"] is True


def test_inspect_dense_model_is_not_moe(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path
    )

    result = _invoke(str(tmp_path), "--json")

    assert result.exit_code == 2
    assert "'llama' is not a supported MoE family" in json.loads(result.stdout)["reason"]


def test_inspect_missing_directory(tmp_path):
    result = _invoke(str(tmp_path / "absent"))

    assert result.exit_code == 2
    assert "not found" in result.stderr


def test_inspect_directory_without_config(tmp_path):
    result = _invoke(str(tmp_path))

    assert result.exit_code == 2
    assert "has no config.json" in result.stderr


def test_inspect_list_families_json():
    result = _invoke("--list-families", "--json")

    rows = {row["model_type"]: row for row in json.loads(result.stdout)}
    assert result.exit_code == 0
    assert rows["mixtral"]["supported"] is True
    assert rows["switch_transformers"]["supported"] is False
    assert "top-1" in rows["switch_transformers"]["reason"]
