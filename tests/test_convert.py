"""Convert round trips: save an adaptive checkpoint, load it both ways in fresh processes, compare logits."""

import math
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gemoe_cli.api import apply_recipe, model_identity
from gemoe_cli.cli.app import app
from gemoe_cli.convert import convert, load_adaptive_model, read_gemoe_section
from gemoe_cli.errors import InvalidInputError, RecipeMismatchError
from gemoe_cli.recipe import LayerRecipe, Recipe, RoutingSettings, save_recipe, static_recipe
from gemoe_cli.routing import find_moe_blocks
from tests import tiny_models

ROUND_TRIP_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
TOLERANCE = 1e-5

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM

    mode, directory, ids_file, out_file = sys.argv[1:]
    if mode == "remote":
        try:
            import gemoe_cli  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("gemoe_cli is importable; the remote-code test would prove nothing")
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    else:
        from gemoe_cli.convert import load_adaptive_model

        model = load_adaptive_model(directory)
    with torch.no_grad():
        logits = model(torch.load(ids_file)).logits
    torch.save({"logits": logits, "sparsity": model.gemoe_routing.sparsity()}, out_file)
    """
)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A virtual environment with torch and transformers visible but not gemoe_cli."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    site_packages = Path(torch.__file__).resolve().parents[1]
    purelib = next((root / "lib").glob("python*/site-packages"))
    # A plain path line: the .pth files inside it (such as an editable gemoe install) are not processed.
    (purelib / "shared_packages.pth").write_text(f"{site_packages}\n")
    return root / "bin" / "python"


def _quantile_recipe(model, source):
    """A recipe whose thresholds sit at entropy quantiles of each layer, so it really drops experts."""
    entropies = {}
    with torch.no_grad():
        from gemoe_cli.routing import attach_adaptive_routing

        with attach_adaptive_routing(model, {}) as routing:
            for layer in routing.layers.values():
                layer.observers.append(lambda event: entropies.setdefault(event.path, event.entropy))
            tiny_models.forward_logits(model, tiny_models.input_ids(batch=2, seq=16, seed=3))
    layers = {}
    for block in find_moe_blocks(model):
        count = block.top_k - 1
        levels = torch.linspace(0, 1, count + 2)[1:-1]
        layers[block.path] = LayerRecipe(thresholds=torch.quantile(entropies[block.path], levels).tolist())
    return Recipe(format_version=1, model=model_identity(model, source), routing=RoutingSettings(), layers=layers)


def _run(python, mode, directory, ids, tmp_path, cwd):
    ids_file, out_file = tmp_path / f"{mode}-ids.pt", tmp_path / f"{mode}-out.pt"
    torch.save(ids, ids_file)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)}
    if mode == "remote":
        env.pop("PYTHONPATH")
    completed = subprocess.run(
        [str(python), str(script), mode, str(directory), str(ids_file), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out_file)


@pytest.mark.parametrize("model_type", ROUND_TRIP_FAMILIES)
def test_convert_round_trip_both_loaders(model_type, tmp_path, bare_python):
    model = tiny_models.build(model_type)
    source = tmp_path / "source"
    model.save_pretrained(source)
    ids = tiny_models.input_ids(batch=2, seq=9, seed=5)
    recipe = _quantile_recipe(model, str(source))
    with torch.no_grad():
        original = tiny_models.forward_logits(model, ids)
        with apply_recipe(model, recipe) as routing:
            adaptive = tiny_models.forward_logits(model, ids)
            sparsity = routing.sparsity()

    convert(str(source), recipe, tmp_path / "adaptive")
    convert(str(source), static_recipe(recipe.model, list(recipe.layers)), tmp_path / "static")

    repository = Path(__file__).resolve().parents[1]
    for mode, python in (("gemoe", sys.executable), ("remote", bare_python)):
        loaded = _run(python, mode, tmp_path / "adaptive", ids, tmp_path, repository)
        assert (loaded["logits"] - adaptive).abs().max().item() <= TOLERANCE, mode
        assert loaded["sparsity"] == pytest.approx(sparsity), mode
        assert sparsity > 0.1
        static = _run(python, mode, tmp_path / "static", ids, tmp_path, repository)
        assert (static["logits"] - original).abs().max().item() <= TOLERANCE, mode


def test_converted_directory_contents(tmp_path):
    model = tiny_models.build("olmoe")
    model.save_pretrained(tmp_path / "source")
    recipe = _quantile_recipe(model, str(tmp_path / "source"))

    output = convert(str(tmp_path / "source"), recipe, tmp_path / "out")

    names = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_gemoe.py", "README.md", "gemoe_recipe.yaml"} <= names
    assert not any(name.endswith(".bin") for name in names)
    section = read_gemoe_section(output)
    assert section["k_min"] == 1
    assert set(section["thresholds"]) == set(recipe.layers)
    assert "trust_remote_code=True" in (output / "README.md").read_text()
    assert "import gemoe_cli" not in (output / "modeling_gemoe.py").read_text()


def test_infinite_thresholds_survive_config_json(tmp_path):
    model = tiny_models.build("mixtral")
    model.save_pretrained(tmp_path / "source")
    identity = model_identity(model)
    paths = [block.path for block in find_moe_blocks(model)]
    recipe = Recipe(
        format_version=1,
        model=identity,
        layers={path: LayerRecipe(thresholds=[-math.inf, 1.0, math.inf]) for path in paths},
    )

    convert(str(tmp_path / "source"), recipe, tmp_path / "out")

    text = (tmp_path / "out" / "config.json").read_text()
    assert "Infinity" not in text
    loaded = load_adaptive_model(tmp_path / "out")
    assert loaded.gemoe_routing.layers[paths[0]].thresholds.tolist() == [-math.inf, 1.0, math.inf]


def test_existing_output_rejected_without_force(tmp_path):
    model = tiny_models.build("mixtral")
    model.save_pretrained(tmp_path / "source")
    recipe = static_recipe(model_identity(model), [block.path for block in find_moe_blocks(model)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")

    with pytest.raises(InvalidInputError, match="already exists"):
        convert(str(tmp_path / "source"), recipe, tmp_path / "out")

    convert(str(tmp_path / "source"), recipe, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "config.json").exists()


def test_recipe_for_another_model_rejected(tmp_path):
    model = tiny_models.build("mixtral")
    model.save_pretrained(tmp_path / "source")
    other = tiny_models.build("mixtral", seed=1)
    recipe = static_recipe(model_identity(other), [block.path for block in find_moe_blocks(other)])

    with pytest.raises(RecipeMismatchError, match="other router weights"):
        convert(str(tmp_path / "source"), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_directory(tmp_path, monkeypatch):
    model = tiny_models.build("mixtral")
    model.save_pretrained(tmp_path / "source")
    recipe = static_recipe(model_identity(model), [block.path for block in find_moe_blocks(model)])

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gemoe_cli.convert._model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / "source"), recipe, tmp_path / "out")

    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["source"]


def test_cli_convert_and_errors(tmp_path):
    runner = CliRunner()
    model = tiny_models.build("qwen3_moe")
    model.save_pretrained(tmp_path / "source")
    recipe_file = tmp_path / "recipe.yaml"
    save_recipe(static_recipe(model_identity(model), [block.path for block in find_moe_blocks(model)]), recipe_file)

    ok = runner.invoke(
        app, ["convert", str(tmp_path / "source"), "--recipe", str(recipe_file), "-o", str(tmp_path / "out")]
    )
    again = runner.invoke(
        app, ["convert", str(tmp_path / "source"), "--recipe", str(recipe_file), "-o", str(tmp_path / "out")]
    )
    missing = runner.invoke(
        app, ["convert", str(tmp_path / "absent"), "--recipe", str(recipe_file), "-o", str(tmp_path / "x")]
    )
    (tmp_path / "noweights").mkdir()
    (tmp_path / "source" / "config.json").replace(tmp_path / "noweights" / "config.json")
    no_weights = runner.invoke(
        app, ["convert", str(tmp_path / "noweights"), "--recipe", str(recipe_file), "-o", str(tmp_path / "y")]
    )

    assert ok.exit_code == 0, ok.output
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert missing.exit_code == 2
    assert "not found" in missing.stderr
    assert no_weights.exit_code == 2
    assert "no *.safetensors weights" in no_weights.stderr
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()
