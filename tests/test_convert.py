"""Convert round trips: save an adaptive checkpoint, load it both ways in fresh processes, compare logits."""

import math
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gemoe_cli.api import apply_recipe, model_identity
from gemoe_cli.cli.app import app
from gemoe_cli.convert import convert, load_adaptive_model, read_gemoe_section
from gemoe_cli.errors import InvalidInputError, RecipeMismatchError
from gemoe_cli.recipe import LayerRecipe, Recipe, RoutingSettings, save_recipe, static_recipe
from gemoe_cli.routing import find_moe_blocks
from tests import tiny_models
from tests.write_faults import FaultyDisk, fault_points, leftovers, snapshot

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


def test_remote_code_returns_loading_info(tmp_path):
    model = tiny_models.build("olmoe")
    model.save_pretrained(tmp_path / "source")
    output = convert(str(tmp_path / "source"), _quantile_recipe(model, str(tmp_path / "source")), tmp_path / "out")

    loaded, info = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, output_loading_info=True)

    assert set(loaded.gemoe_routing.layers) == {block.path for block in find_moe_blocks(loaded)}
    assert not info["missing_keys"]


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


# --- bad input through the CLI: exit code 2, one line naming the value and the fix, nothing written -----


@pytest.fixture(scope="module")
def cli_source(tmp_path_factory):
    """A saved tiny qwen3_moe with a tokenizer, and the data of a recipe that matches it."""
    import yaml

    root = tmp_path_factory.mktemp("convert-cli")
    model = tiny_models.build("qwen3_moe")
    source = tiny_models.save_with_tokenizer(model, root / "source")
    recipe_file = root / "recipe.yaml"
    save_recipe(_quantile_recipe(model, source), recipe_file)
    return source, recipe_file, yaml.safe_load(recipe_file.read_text())


def _convert_cli(source, recipe_file, output, *options):
    return CliRunner().invoke(app, ["convert", str(source), "--recipe", str(recipe_file), "-o", str(output), *options])


def _edited_recipe(data, tmp_path, edit):
    import copy

    import yaml

    edited = copy.deepcopy(data)
    edit(edited)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    return path


def _rename_first_layer(data):
    first = next(iter(data["layers"]))
    data["layers"]["model.layers.0.self_attn"] = data["layers"].pop(first)


def _raise_top_k(data):
    # One more threshold per layer, so the recipe stays valid for its own top_k of 5.
    data["model"]["top_k"] = 5
    for layer in data["layers"].values():
        layer["thresholds"].append(100.0)


def _set(section, **values):
    return lambda data: data[section].update(values)


def _set_thresholds(values):
    return lambda data: data["layers"]["model.layers.0.mlp"].update(thresholds=values)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _rename_first_layer,
            "recipe layer 'model.layers.0.self_attn' is not an MoE layer of the model; the model has 2 MoE layers, "
            "for example 'model.layers.0.mlp'; calibrate a recipe for this model with `gemoe calibrate`.",
        ),
        (
            _set("model", num_experts=16),
            "recipe does not match the model: num_experts=16 in the recipe but 8 in the model; calibrate a recipe "
            "for this model with `gemoe calibrate`.",
        ),
        (
            _set("model", model_type="mixtral"),
            "recipe does not match the model: model_type='mixtral' in the recipe but 'qwen3_moe' in the model; "
            "calibrate a recipe for this model with `gemoe calibrate`.",
        ),
        (
            _raise_top_k,
            "recipe does not match the model: top_k=5 in the recipe but 4 in the model; calibrate a recipe for "
            "this model with `gemoe calibrate`.",
        ),
        (
            _set("model", router_fingerprint="0" * 64),
            "recipe was fitted on other router weights (router_fingerprint 000000000000... in the recipe, ",
        ),
        (
            _set_thresholds([1.0, 0.5, 2.0]),
            "layers[model.layers.0.mlp].thresholds must be non-decreasing, but "
            "layers[model.layers.0.mlp].thresholds[1]=0.5 < layers[model.layers.0.mlp].thresholds[0]=1.0; sort them.",
        ),
        (_set("routing", k_min=3, k_max=2), "routing.k_min=3 is greater than routing.k_max=2; set k_min <= k_max."),
        (
            _set("routing", k_max=6),
            "routing.k_max=6 is greater than model.top_k=4; set k_max to at most 4, or leave it out to use top_k.",
        ),
        (_set("routing", k_min=0), "routing.k_min=0 is invalid; set k_min to 1 or more."),
    ],
    ids=["layer-path", "experts", "family", "top-k", "fingerprint", "decreasing", "k-min-above-k-max",
         "k-max-above-top-k", "k-min-zero"],
)  # fmt: skip
def test_cli_recipe_mismatch_rejected(cli_source, tmp_path, edit, message):
    source, _, data = cli_source
    recipe_file = _edited_recipe(data, tmp_path, edit)

    result = _convert_cli(source, recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_cli_fingerprint_override_warns(cli_source, tmp_path):
    source, _, data = cli_source
    recipe_file = _edited_recipe(data, tmp_path, _set("model", router_fingerprint="0" * 64))

    result = _convert_cli(source, recipe_file, tmp_path / "out", "--ignore-fingerprint")

    assert result.exit_code == 0, result.output
    assert "other router weights" in result.stderr
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("phimoe", "model type 'phimoe' is not supported: its sparsemixer router"),
        ("switch_transformers", "model type 'switch_transformers' is not supported: "),
    ],
)
def test_cli_unsupported_family_rejected(cli_source, tmp_path, model_type, message):
    _, recipe_file, _ = cli_source
    tiny_models.build(model_type).save_pretrained(tmp_path / model_type)

    result = _convert_cli(tmp_path / model_type, recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "use a model of a supported family (`gemoe inspect --list-families` lists them)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_model_without_moe_layers_rejected(cli_source, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, recipe_file, _ = cli_source
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")

    result = _convert_cli(tmp_path / "dense", recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    assert (
        "model type 'llama' is not a supported MoE family; run `gemoe inspect --list-families` for the supported ones."
        in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_cli_pickle_weights_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source
    pickled = tmp_path / "pickled"
    tiny_models.build("qwen3_moe").save_pretrained(pickled, safe_serialization=False)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save({}, pickled / "pytorch_model.bin")

    result = _convert_cli(pickled, recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    assert "has only pickle (.bin/.pt) weights; convert them to safetensors, or pass --allow-pickle" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_existing_output_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")

    result = _convert_cli(source, recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    expected = f"output directory {tmp_path / 'out'} already exists; choose another path or pass --force to replace it."
    assert expected in result.stderr
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cli_output_under_a_file_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source
    (tmp_path / "file").write_text("x")

    result = _convert_cli(source, recipe_file, tmp_path / "file" / "out")

    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'file'} is a file, not a folder; choose another path." in result.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_cli_output_folder_missing_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source

    result = _convert_cli(source, recipe_file, tmp_path / "absent" / "out")

    assert result.exit_code == 2, result.output
    assert f"folder {tmp_path / 'absent'} does not exist; create it first." in result.stderr
    assert not (tmp_path / "absent").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_cli_read_only_output_folder_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _convert_cli(source, recipe_file, folder / "out")
    finally:
        folder.chmod(0o755)

    assert result.exit_code == 2, result.output
    assert f"folder {folder} is not writable; choose another path." in result.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cli_unavailable_device_map_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source

    result = _convert_cli(source, recipe_file, tmp_path / "out", "--device-map", "cuda")

    assert result.exit_code == 2, result.output
    assert "--device-map cuda is not available: no CUDA GPU found; use --device-map cpu or leave it out." in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_cli_invalid_dtype_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source

    result = _convert_cli(source, recipe_file, tmp_path / "out", "--dtype", "int3")

    assert result.exit_code == 2, result.output
    assert "--dtype int3 is unknown; use auto, float32, bfloat16 or float16." in result.stderr


# --- faults while the checkpoint directory is written ---------------------------------------------------


def _record_convert_writes(source, recipe_file, outputs, monkeypatch):
    """Convert once with an unlimited disk; return the files written, then remove the output again."""
    import shutil

    with monkeypatch.context() as patch:
        disk = FaultyDisk(outputs).install(patch)
        result = _convert_cli(source, recipe_file, outputs / "out")
    assert result.exit_code == 0, result.output
    shutil.rmtree(outputs / "out")
    return disk.written


def test_cli_full_disk_in_each_file_leaves_nothing(cli_source, tmp_path, monkeypatch):
    source, recipe_file, _ = cli_source
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    written = _record_convert_writes(source, recipe_file, outputs, monkeypatch)
    names = {name for name, _ in written}
    assert {"config.json", "model.safetensors", "modeling_gemoe.py", "gemoe_recipe.yaml", "README.md"} <= names

    for name, capacity in fault_points(written):
        with monkeypatch.context() as patch:
            disk = FaultyDisk(outputs, capacity).install(patch)
            result = _convert_cli(source, recipe_file, outputs / "out")

        assert disk.failed == [name]
        assert result.exit_code == 3, (name, result.output)
        assert (
            f"error: cannot write output directory {outputs / 'out'}: no space left on device (the disk or the "
            "quota is full); free space on that file system or choose another output path." in result.stderr
        ), name
        assert "Traceback" not in result.output, name
        assert leftovers(outputs, set()) == [], name


def test_cli_full_disk_keeps_previous_checkpoint(cli_source, tmp_path, monkeypatch):
    source, recipe_file, _ = cli_source
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    written = _record_convert_writes(source, recipe_file, outputs, monkeypatch)
    previous = outputs / "out"
    previous.mkdir()
    (previous / "config.json").write_text('{"previous": true}')
    before = snapshot(previous)

    for name, capacity in fault_points(written):
        with monkeypatch.context() as patch:
            FaultyDisk(outputs, capacity).install(patch)
            result = _convert_cli(source, recipe_file, previous, "--force")

        assert result.exit_code == 3, (name, result.output)
        assert "no space left on device" in result.stderr, name
        assert snapshot(previous) == before, name
        assert leftovers(outputs, {"out"}) == [], name


def test_cli_interrupt_in_each_file_leaves_nothing(cli_source, tmp_path, monkeypatch):
    source, recipe_file, _ = cli_source
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    written = _record_convert_writes(source, recipe_file, outputs, monkeypatch)

    for name, capacity in fault_points(written):
        with monkeypatch.context() as patch:
            FaultyDisk(outputs, capacity, error=KeyboardInterrupt).install(patch)
            result = _convert_cli(source, recipe_file, outputs / "out")

        assert result.exit_code == 130, (name, result.output)
        assert result.stderr.strip().endswith("interrupted"), name
        assert leftovers(outputs, set()) == [], name


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_cli_output_over_source_rejected(cli_source, tmp_path, force):
    source, recipe_file, _ = cli_source
    before = snapshot(Path(source))

    for output in (Path(source), Path(source).parent, Path(source) / ".."):
        result = _convert_cli(source, recipe_file, output, *force)

        assert result.exit_code == 2, result.output
        assert f"output directory {output} " in result.stderr
        assert f"the model folder {source}" in result.stderr
        assert "choose an output directory" in result.stderr
    assert snapshot(Path(source)) == before


def test_cli_source_without_tokenizer_warns(tmp_path):
    model = tiny_models.build("qwen3_moe")
    model.save_pretrained(tmp_path / "source")
    recipe_file = tmp_path / "recipe.yaml"
    save_recipe(static_recipe(model_identity(model), [block.path for block in find_moe_blocks(model)]), recipe_file)

    result = _convert_cli(tmp_path / "source", recipe_file, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "has no tokenizer files, so the checkpoint has no tokenizer" in " ".join(result.stderr.split())
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert not written & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}
    bench = CliRunner().invoke(app, ["bench", str(tmp_path / "out"), "--prompt-len", "16", "--gen-len", "4"])
    assert bench.exit_code == 2, bench.output
    assert "has no usable tokenizer" in bench.stderr


def test_cli_unknown_device_map_rejected(cli_source, tmp_path):
    source, recipe_file, _ = cli_source

    result = _convert_cli(source, recipe_file, tmp_path / "out", "--device-map", "foo")

    assert result.exit_code == 2, result.output
    assert "--device-map foo is unknown; use auto, balanced, balanced_low_0, sequential, or a device" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_truncated_weights_rejected(cli_source, tmp_path):
    import shutil

    source, recipe_file, _ = cli_source
    damaged = Path(shutil.copytree(source, tmp_path / "damaged"))
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = _convert_cli(damaged, recipe_file, tmp_path / "out")

    assert result.exit_code == 2, result.output
    assert f"cannot read the weights {weights}: " in result.stderr
    assert "download or save the checkpoint again." in result.stderr
    assert not (tmp_path / "out").exists()
