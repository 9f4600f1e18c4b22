"""End-to-end tests of `gemoe bench` on a saved tiny OLMoE: the JSON record, gates and invalid input."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gemoe_cli.cli.app import app
from gemoe_cli.recipe import save_recipe
from tests.bench.conftest import fitted_recipe
from tests.tiny_models import build
from tests.write_faults import FaultyDisk, leftovers

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "bench.md"

runner = CliRunner()

# Small enough for a few seconds per run on two CPU cores; 5 held-out blocks of 32 tokens.
FAST_ARGS = [
    "--device", "cpu",
    "--num-samples", "24",
    "--seq-len", "32",
    "--prompt-len", "16",
    "--gen-len", "4",
    "--prefill-batch-size", "2",
    "--eval-batch-size", "4",
]  # fmt: skip

PHASES = ("prefill", "decode")


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args])


@pytest.fixture(scope="module")
def profiled_run(tiny_model_dir, tiny_recipe, tmp_path_factory):
    """One profiled run with a passing retention gate: (CLI result, JSON record)."""
    output = tmp_path_factory.mktemp("bench-cli") / "bench.json"
    result = invoke(
        str(tiny_model_dir),
        "--recipe", str(tiny_recipe),
        "--json", str(output),
        "--profile-moe",
        "--fail-under-retention", "0.5",
        *FAST_ARGS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, json.loads(output.read_text())


# --- the documented schema ----------------------------------------------------------------------------


def documented_fields() -> dict[str, list[tuple[str, str]]]:
    """Return the (field, type) rows of the JSON tables in docs/bench.md: the record, Stats and Sparsity."""
    section = DOCS.read_text("utf-8").split("## JSON record", 1)[1]
    tables: dict[str, list[tuple[str, str]]] = {"record": []}
    current = "record"
    for line in section.splitlines():
        if line.startswith("### "):
            current = line.removeprefix("### ").strip()
            tables[current] = []
        match = re.match(r"^\| `([^`]+)` \| ([^|]+) \|", line)
        if match:
            tables[current].append((match.group(1), match.group(2).strip()))
    return tables


def resolve(value, path: str) -> list:
    """Return every value `path` reaches in `value`; a placeholder expands to all keys, a null ends a branch.

    Branches that end at a null give None. A missing key fails the test with the path.
    """
    branches = [value]
    for part in path.split("."):
        reached = []
        for branch in branches:
            if branch is None:
                reached.append(None)
                continue
            assert isinstance(branch, dict), f"{path}: {part} is inside a {type(branch).__name__}, not an object"
            if part == "<phase>":
                keys = list(PHASES)
            elif part.startswith("<"):
                keys = list(branch)
            else:
                keys = [part]
            for key in keys:
                assert key in branch, f"{path}: key {key!r} is missing (keys: {sorted(branch)})"
                reached.append(branch[key])
        branches = reached
    return branches


def test_json_has_every_documented_field(profiled_run):
    _, record = profiled_run
    tables = documented_fields()
    assert len(tables["record"]) > 50
    for path, kind in tables["record"]:
        values = resolve(record, path)
        # The sweep runs only with --plot, and a type "... or null" may be null in any run.
        if not path.startswith("sweep") and "or null" not in kind:
            assert any(value is not None for value in values), f"{path} is null everywhere"
        for value in values:
            if value is None or kind not in ("Stats", "Sparsity"):
                continue
            for field, _ in tables[kind]:
                resolve(value, field)


def test_json_has_no_undocumented_top_level_field(profiled_run):
    _, record = profiled_run
    documented = {path.split(".")[0] for path, _ in documented_fields()["record"]}
    assert set(record) == documented


def test_policies_in_order(profiled_run):
    _, record = profiled_run
    assert list(record["policies"]) == ["static_native", "static", "gemoe", "top_p", "ratio_skip", "static_k_minus_1"]


def test_passing_gate_recorded(profiled_run):
    _, record = profiled_run
    assert record["gates"] == [
        {
            "option": "--fail-under-retention",
            "measured": record["policies"]["gemoe"]["retention"],
            "required_min": 0.5,
            "passed": True,
        }
    ]


def test_tables_printed(profiled_run):
    result, _ = profiled_run
    for fragment in ("quality and sparsity", "static_k_minus_1", "target decode speedup", "routing overhead"):
        assert fragment in result.output


def test_targets_measured_with_profile(profiled_run):
    _, record = profiled_run
    targets = record["targets"]
    for phase in PHASES:
        assert targets["moe_time_reduction"][phase]["measured"] is not None
        assert targets["routing_overhead"][phase]["measured"] is not None
        sparsity = record["policies"]["gemoe"][phase]["sparsity"]["overall"]
        assert targets["moe_time_reduction"][phase]["required_min"] == pytest.approx(0.8 * sparsity)


def test_eval_set_is_calibrate_heldout_split(profiled_run):
    _, record = profiled_run
    assert record["data"]["heldout_blocks"] == round(24 * 0.2)
    assert record["inputs"]["eval_tokens"] == record["data"]["heldout_blocks"] * 32


# --- gates --------------------------------------------------------------------------------------------


def test_failed_gates_exit_1_after_json(tiny_model_dir, tiny_recipe, tmp_path):
    output = tmp_path / "bench.json"
    result = invoke(
        str(tiny_model_dir), "--recipe", str(tiny_recipe), "--json", str(output),
        "--fail-under-retention", "1.01", "--fail-under-speedup", "1000", *FAST_ARGS,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    record = json.loads(output.read_text())
    measured = record["policies"]["gemoe"]["retention"]
    assert measured < 1.01
    assert f"gemoe nll retention {measured:.4f} is below --fail-under-retention 1.01" in result.output
    assert "gemoe decode speedup over static" in result.output
    assert "is below --fail-under-speedup 1000" in result.output
    assert [gate["passed"] for gate in record["gates"]] == [False, False]


# --- converted checkpoints and plots --------------------------------------------------------------------


def test_converted_dir_uses_config_thresholds(tiny_model_dir, tiny_recipe, profiled_run, tmp_path):
    from gemoe_cli.convert import convert
    from gemoe_cli.recipe import load_recipe

    converted = convert(str(tiny_model_dir), load_recipe(tiny_recipe), tmp_path / "converted")
    output = tmp_path / "bench.json"
    result = invoke(str(converted), "--json", str(output), *FAST_ARGS)
    assert result.exit_code == 0, result.output

    record = json.loads(output.read_text())
    assert record["routing"]["source"] == f"{converted}/config.json (gemoe section)"
    _, from_recipe = profiled_run
    gemoe, reference = record["policies"]["gemoe"], from_recipe["policies"]["gemoe"]
    assert gemoe["evaluation"]["sparsity"] == reference["evaluation"]["sparsity"]
    assert gemoe["retention"] == pytest.approx(reference["retention"], abs=1e-9)


def test_plot_written_with_sweep(tiny_model_dir, tiny_recipe, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    output = tmp_path / "bench.json"
    result = invoke(
        str(tiny_model_dir), "--recipe", str(tiny_recipe), "--json", str(output), "--plot", str(plot),
        "--sweep-points", "3", *FAST_ARGS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(output.read_text())["sweep"]
    assert set(sweep) == {"gemoe", "top_p", "ratio_skip", "static_k"}
    assert len(sweep["gemoe"]) == 3
    assert sweep["gemoe"][1]["parameter"] == 0.0
    assert [point["parameter"] for point in sweep["static_k"]] == [1.0, 2.0, 3.0, 4.0]


def test_plot_without_matplotlib_exits_2(tiny_model_dir, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 2, result.output
    assert "--plot needs matplotlib" in result.output
    assert "pip install 'gemoe[plot]'" in result.output


# --- invalid input ------------------------------------------------------------------------------------


def test_recipe_for_other_model_exits_2(tiny_model_dir, tmp_path):
    recipe = tmp_path / "qwen3.yaml"
    save_recipe(fitted_recipe(build("qwen3_moe")), recipe)
    result = invoke(str(tiny_model_dir), "--recipe", str(recipe), *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert "recipe does not match the model" in result.output
    assert "model_type='qwen3_moe' in the recipe but 'olmoe' in the model" in result.output


def test_recipe_for_other_router_weights_exits_2(tiny_model_dir, tmp_path):
    recipe = tmp_path / "other-weights.yaml"
    save_recipe(fitted_recipe(build("olmoe", seed=1)), recipe)
    result = invoke(str(tiny_model_dir), "--recipe", str(recipe), *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert "router_fingerprint" in result.output
    assert "--ignore-fingerprint" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_unavailable_device_exits_2(tiny_model_dir, tiny_recipe):
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "--device cuda is not available" in result.output


def test_missing_model_dir_exits_2(tiny_recipe, tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke(str(missing), "--recipe", str(tiny_recipe), *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert f"model directory {missing} not found" in result.output


def test_model_dir_without_recipe_exits_2(tiny_model_dir):
    result = invoke(str(tiny_model_dir), *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert "is not converted (its config.json has no gemoe section)" in result.output
    assert "pass --recipe FILE from gemoe calibrate, or convert the model first" in result.output


def test_json_folder_not_writable_exits_2_before_work(tiny_model_dir, tiny_recipe):
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), "--json", "/proc/x.json", *FAST_ARGS)

    assert result.exit_code == 2, result.output
    assert "--json /proc/x.json: folder /proc is not writable" in result.output
    assert "static_native" not in result.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--repeats", "4", "--repeats 4 is too few; use 5 or more"),
        ("--gen-len", "1", "--gen-len 1 is too short"),
        ("--metric", "bleu", "--metric bleu is unknown"),
        ("--dtype", "int8", "--dtype int8 is unknown"),
        ("--fail-under-retention", "0", "--fail-under-retention 0.0 is invalid"),
        ("--json", "bench.txt", "use .json"),
        ("--threads", "0", "--threads 0 is invalid"),
    ],
)
def test_invalid_option_exits_2(tiny_model_dir, tiny_recipe, option, value, message):
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), option, value)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_prompt_beyond_position_limit_exits_2(tiny_model_dir, tiny_recipe):
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), "--prompt-len", "120", "--gen-len", "16")
    assert result.exit_code == 2, result.output
    assert "exceed the model's limit of 128" in result.output


def test_bench_listed_in_root_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "bench" in result.output


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_in_missing_folder_exits_2(tiny_model_dir, tiny_recipe, tmp_path, option):
    path = tmp_path / "absent" / ("bench.json" if option == "--json" else "bench.png")
    result = invoke(str(tiny_model_dir), "--recipe", str(tiny_recipe), option, str(path), *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert f"{option} {path}: folder {tmp_path / 'absent'} does not exist; create it first." in result.output
    assert list(tmp_path.iterdir()) == []


# --- faults while the JSON record and the plot are written ----------------------------------------------


def test_full_disk_keeps_previous_json_and_plot(tiny_model_dir, tiny_recipe, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "out"
    folder.mkdir()
    json_path, plot = folder / "bench.json", folder / "bench.png"
    json_path.write_text('{"previous": true}\n')
    plot.write_bytes(b"previous plot")
    arguments = (
        str(tiny_model_dir), "--recipe", str(tiny_recipe), "--json", str(json_path), "--plot", str(plot),
        "--sweep-points", "0", *FAST_ARGS,
    )  # fmt: skip

    for name, what in (("bench.json", "benchmark JSON"), ("bench.png", "plot")):
        # The disk fills 500 bytes into the file, after the other file (if written first) is complete.
        with monkeypatch.context() as patch:
            faulty = FaultyDisk(folder, 500, file=name).install(patch)
            result = invoke(*arguments)

        assert faulty.failed == [name]
        assert dict(faulty.written)[name] == 500
        assert result.exit_code == 3, (name, result.output)
        assert (
            f"error: cannot write {what} {folder / name}: no space left on device (the disk or the quota is full); "
            "free space on that file system or choose another output path." in result.stderr
        ), name
        assert json_path.read_text() == '{"previous": true}\n', name
        assert plot.read_bytes() == b"previous plot", name
        assert leftovers(folder, {"bench.json", "bench.png"}) == [], name
