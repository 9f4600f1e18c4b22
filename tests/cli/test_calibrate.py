import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gemoe_cli.cli.app import app
from tests import tiny_models
from tests.write_faults import FaultyDisk, fault_points, leftovers, snapshot

runner = CliRunner()
FAST = ["--num-samples", "24", "--seq-len", "32", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.save_with_tokenizer(tiny_models.build("olmoe"), tmp_path_factory.mktemp("olmoe"))


def _calibrate(model_dir, *args):
    return runner.invoke(app, ["calibrate", model_dir, *FAST, *args])


def test_calibrate_writes_recipe_and_report(model_dir, tmp_path):
    recipe_file, report_file = tmp_path / "recipe.yaml", tmp_path / "report.json"

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "-o", str(recipe_file), "--report", str(report_file))

    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(recipe_file.read_text())
    report = json.loads(report_file.read_text())
    assert recipe["format_version"] == 1
    assert recipe["model"]["model_type"] == "olmoe"
    assert set(recipe["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert recipe["calibration"]["budget"]["target_sparsity"] == 0.3
    assert 0.0 <= recipe["calibration"]["measured"]["heldout_sparsity"] <= 0.75
    layer = report["layers"]["model.layers.0.mlp"]
    assert set(layer["entropy_quantiles"]) == {"0.05", "0.25", "0.5", "0.75", "0.95"}
    assert sum(layer["heldout_k_histogram"]) > 0
    assert report["heldout"]["tokens"] > 0
    assert "retention" in report["heldout"]


def test_same_seed_gives_identical_recipe(model_dir, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"

    _calibrate(model_dir, "--target-sparsity", "0.25", "-o", str(first))
    _calibrate(model_dir, "--target-sparsity", "0.25", "-o", str(second))

    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("option", ["--target-sparsity", "--min-retention"])
@pytest.mark.parametrize("budget", ["0", "1", "1.5", "-0.2", "nan"])
def test_budget_outside_unit_interval(model_dir, tmp_path, option, budget):
    result = _calibrate(model_dir, option, budget, "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: {option} {float(budget)} is outside (0, 1); pass a fraction such as 0.35." in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_budget(model_dir, tmp_path):
    result = _calibrate(model_dir, "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert "no budget given" in result.stderr


def test_unreachable_sparsity_names_frontier(model_dir, tmp_path):
    result = _calibrate(model_dir, "--target-sparsity", "0.6", "--k-min", "3", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert (
        "--target-sparsity 0.6 is unreachable: with --k-min 3 the highest sparsity is 0.2500; lower the target or "
        "--k-min." in result.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_unreachable_budget_pair_names_frontier(model_dir, tmp_path):
    result = _calibrate(
        model_dir, "--policy", "uniform", "--target-sparsity", "0.74", "--min-retention", "0.9999999",
        "-o", str(tmp_path / "r.yaml"), "--report", str(tmp_path / "report.json"),
    )  # fmt: skip

    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2
    assert len(error_lines) == 1
    assert "budget unreachable: --target-sparsity 0.74 gives held-out nll retention " in error_lines[0]
    assert "< --min-retention 0.9999999; the best reachable pair is sparsity " in error_lines[0]
    assert "measured frontier (sparsity, retention): (" in error_lines[0]
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dataset", str(empty), "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: dataset {empty} is empty; give it at least one non-empty sample." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_dataset_folder_without_text_files(model_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dataset", str(folder), "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: dataset folder {folder} has no .txt or .jsonl files." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_missing_dataset(model_dir, tmp_path):
    missing = tmp_path / "absent.txt"

    result = _calibrate(
        model_dir, "--target-sparsity", "0.3", "--dataset", str(missing), "-o", str(tmp_path / "r.yaml")
    )

    assert result.exit_code == 2
    assert f"error: dataset {missing} not found; pass a .txt/.jsonl file, a folder, hf:NAME or builtin." in (
        result.stderr
    )
    assert not (tmp_path / "r.yaml").exists()


def test_unreadable_dataset(model_dir, tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81binary")

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dataset", str(binary), "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: cannot read dataset {binary}: " in result.stderr
    assert "; check that it is UTF-8 text." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_dataset_with_too_few_tokens(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Routers route.")

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dataset", str(short), "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert (
        f"error: dataset {short} has 6 tokens, fewer than two blocks of --seq-len 32; add data or lower --seq-len."
        in result.stderr
    )
    assert not (tmp_path / "r.yaml").exists()


def test_invalid_jsonl_line(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"nope": 1}\n')

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dataset", str(data), "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert "line 2 has no 'text' string or 'messages' list" in result.stderr


def test_sequence_longer_than_model_limit(model_dir, tmp_path):
    result = runner.invoke(
        app,
        ["calibrate", model_dir, "--target-sparsity", "0.3", "--seq-len", "100000", "-o", str(tmp_path / "r.yaml")],
    )

    assert result.exit_code == 2
    assert "error: --seq-len 100000 is above the model's limit of 128 positions; lower it." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_model_without_tokenizer(tmp_path):
    source = tmp_path / "model"
    tiny_models.build("olmoe").save_pretrained(source)

    result = _calibrate(str(source), "--target-sparsity", "0.3", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: model {source} has no usable tokenizer (no tokenizer.json, tokenizer_config.json); save one " in (
        result.stderr
    )
    assert "save one with the model." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_output_folder_missing(model_dir, tmp_path):
    result = _calibrate(model_dir, "--target-sparsity", "0.3", "-o", str(tmp_path / "absent" / "r.yaml"))

    assert result.exit_code == 2
    assert "does not exist" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_unavailable_device(model_dir, tmp_path):
    result = runner.invoke(
        app, ["calibrate", model_dir, "--target-sparsity", "0.3", "--device", "cuda", "-o", str(tmp_path / "r.yaml")]
    )

    assert result.exit_code == 2
    assert "error: --device cuda is not available: no CUDA GPU found; use --device cpu or auto." in result.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_sigint_leaves_no_partial_recipe(model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    output = tmp_path / "out" / "recipe.yaml"
    output.parent.mkdir()
    # Text the tiny tokenizer knows, so the run has thousands of blocks and is still busy when interrupted.
    dataset = tmp_path / "long.txt"
    dataset.write_text(
        "\n\n".join(["Routers send each token to a few experts. A confident router needs fewer."] * 40000)
    )
    command = [
        sys.executable,
        "-m",
        "gemoe_cli",
        "--verbose",
        "calibrate",
        model_dir,
        "--target-sparsity",
        "0.3",
        "--dataset",
        str(dataset),
        "--num-samples",
        "20000",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "-o",
        str(output),
        "--report",
        str(tmp_path / "out" / "report.json"),
    ]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # A shell running this suite in the background starts children with SIGINT ignored, as a terminal never
    # would, so the child gets the default disposition back (Python then turns SIGINT into KeyboardInterrupt).
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Log lines can reach the pipe late, so interrupt after a fixed delay: the run lasts far longer, and
    # wherever Ctrl-C lands (loading, data, calibration) it must leave nothing behind.
    time.sleep(6.0)
    still_running = process.poll() is None
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    code = process.wait(timeout=120)

    assert still_running, stderr[-2000:]
    assert code == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert list(output.parent.iterdir()) == []


def test_preset_settings_apply_and_command_line_overrides(model_dir, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("model: tiny\ncalibrate:\n  target_sparsity: 0.2\n  seed: 3\n  num_samples: 24\nthresholds: {}\n")
    output = tmp_path / "r.yaml"

    result = runner.invoke(
        app,
        [
            "calibrate",
            model_dir,
            "--recipe",
            str(preset),
            "--seq-len",
            "32",
            "--seed",
            "5",
            "--device",
            "cpu",
            "-o",
            str(output),
        ],
    )

    assert result.exit_code == 0, result.output
    calibration = yaml.safe_load(output.read_text())["calibration"]
    assert calibration["budget"]["target_sparsity"] == 0.2
    assert calibration["data"]["seed"] == 5


def test_preset_with_unknown_setting(model_dir, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("calibrate:\n  target_sparsty: 0.2\n")

    result = runner.invoke(app, ["calibrate", model_dir, "--recipe", str(preset), "-o", str(tmp_path / "r.yaml")])

    assert result.exit_code == 2
    assert "unknown setting 'target_sparsty'" in result.stderr


def test_shipped_presets_are_valid():
    from pathlib import Path

    from gemoe_cli.cli.calibrate import PRESET_KEYS

    presets = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert len(presets) >= 5
    for path in presets:
        data = yaml.safe_load(path.read_text())
        assert set(data["calibrate"]) <= set(PRESET_KEYS), path.name
        assert 0 < data["calibrate"]["target_sparsity"] < 1, path.name


# --- faults while the recipe and the report are written ------------------------------------------------


def _calibrate_into(model_dir, folder):
    return _calibrate(
        model_dir, "--policy", "uniform", "--target-sparsity", "0.3",
        "-o", str(folder / "recipe.yaml"), "--report", str(folder / "report.json"),
    )  # fmt: skip


def _record_calibrate_writes(model_dir, folder, monkeypatch):
    with monkeypatch.context() as patch:
        disk = FaultyDisk(folder).install(patch)
        result = _calibrate_into(model_dir, folder)
    assert result.exit_code == 0, result.output
    return disk.written


@pytest.mark.parametrize("previous", [False, True], ids=["new-files", "previous-files"])
def test_full_disk_keeps_previous_recipe_and_report(model_dir, tmp_path, monkeypatch, previous):
    folder = tmp_path / "out"
    folder.mkdir()
    written = _record_calibrate_writes(model_dir, folder, monkeypatch)
    assert [name for name, _ in written] == ["recipe.yaml", "report.json"]
    if previous:
        (folder / "recipe.yaml").write_text("previous recipe\n")
        (folder / "report.json").write_text("{}\n")
    else:
        for path in list(folder.iterdir()):
            path.unlink()
    before = {name: snapshot(folder / name) for name in sorted(path.name for path in folder.iterdir())}

    for name, capacity in fault_points(written):
        with monkeypatch.context() as patch:
            disk = FaultyDisk(folder, capacity).install(patch)
            result = _calibrate_into(model_dir, folder)

        what = {"recipe.yaml": "recipe file", "report.json": "report"}[name]
        assert disk.failed == [name]
        assert result.exit_code == 3, (name, result.output)
        assert (
            f"error: cannot write {what} {folder / name}: no space left on device (the disk or the quota is full); "
            "free space on that file system or choose another output path." in result.stderr
        ), name
        assert "Traceback" not in result.output, name
        assert {path.name: snapshot(path) for path in sorted(folder.iterdir())} == before, name


def test_interrupt_while_writing_leaves_no_partial_recipe(model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    written = _record_calibrate_writes(model_dir, folder, monkeypatch)
    for path in list(folder.iterdir()):
        path.unlink()

    for name, capacity in fault_points(written):
        with monkeypatch.context() as patch:
            FaultyDisk(folder, capacity, error=KeyboardInterrupt).install(patch)
            result = _calibrate_into(model_dir, folder)

        assert result.exit_code == 130, (name, result.output)
        assert result.stderr.strip().endswith("interrupted"), name
        assert leftovers(folder, set()) == [], name
