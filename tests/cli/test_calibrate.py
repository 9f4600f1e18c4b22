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
    example = "0.35" if option == "--target-sparsity" else "0.99"
    assert f"error: {option} {float(budget)} is outside (0, 1); pass a fraction such as {example}." in result.stderr
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


def test_target_below_k_max_floor(model_dir, tmp_path):
    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--k-max", "2", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert (
        "error: --target-sparsity 0.3 is unreachable: with --k-max 2 the lowest sparsity is 0.5000; raise --k-max "
        "or the target." in result.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_retention_search_starts_at_k_max_floor(model_dir, tmp_path):
    recipe_file, report_file = tmp_path / "r.yaml", tmp_path / "report.json"

    result = _calibrate(
        model_dir, "--policy", "uniform", "--min-retention", "0.5", "--k-max", "2",
        "-o", str(recipe_file), "--report", str(report_file),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    searched = [point["target_sparsity"] for point in json.loads(report_file.read_text())["retention_search"]]
    assert min(searched) >= 0.5


def test_unreachable_retention_names_lowest_measured_sparsity(model_dir, tmp_path):
    result = _calibrate(
        model_dir, "--policy", "uniform", "--min-retention", "0.9999999", "--k-max", "2",
        "-o", str(tmp_path / "r.yaml"),
    )  # fmt: skip

    assert result.exit_code == 2
    assert "error: --min-retention 0.9999999 is unreachable: at the lowest sparsity measured, 0.5000" in result.stderr
    assert "; lower it or raise --k-max." in result.stderr
    assert "sparsity 0 " not in result.stderr


def test_unreachable_error_has_no_blank_line(model_dir, tmp_path):
    result = _calibrate(model_dir, "--target-sparsity", "0.6", "--k-min", "3", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "\n\nerror:" not in result.stderr
    assert "error: --target-sparsity 0.6 is unreachable" in result.stderr


def test_k_min_zero_names_valid_range(model_dir, tmp_path):
    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--k-min", "0", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert "error: --k-min 0 is outside [1, k_max=4]; use a value from 1 to 4." in result.stderr


@pytest.mark.parametrize("dtype", ["int8", "foo", "float64"])
def test_invalid_dtype(model_dir, tmp_path, dtype):
    result = _calibrate(model_dir, "--target-sparsity", "0.3", "--dtype", dtype, "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: --dtype {dtype} is unknown; use auto, float32, bfloat16 or float16." in result.stderr


@pytest.mark.parametrize("report_name", ["t.json", "./t.json"])
def test_recipe_and_report_same_path(model_dir, tmp_path, monkeypatch, report_name):
    monkeypatch.chdir(tmp_path)

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "-o", "t.json", "--report", report_name)

    assert result.exit_code == 2
    assert "error: -o and --report are both" in result.stderr
    assert "give --report another path." in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_unwritable_output_folder_fails_before_model_loads(model_dir, tmp_path, monkeypatch, option):
    import gemoe_cli.calibration.pipeline as pipeline

    def fail_if_called(*args, **kwargs):
        raise AssertionError("calibration ran although an output folder is not writable")

    monkeypatch.setattr(pipeline, "run_calibration", fail_if_called)
    paths = {"-o": str(tmp_path / "r.yaml"), "--report": str(tmp_path / "report.json")}
    paths[option] = "/proc/x.json" if option == "--report" else "/proc/x.yaml"

    result = _calibrate(model_dir, "--target-sparsity", "0.3", "-o", paths["-o"], "--report", paths["--report"])

    assert result.exit_code == 2
    assert f"error: {option} {paths[option]}: folder /proc is not writable" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_image_dataset_on_text_only_model(model_dir, tmp_path):
    result = _calibrate(
        model_dir, "--target-sparsity", "0.3", "--dataset", "builtin-images", "-o", str(tmp_path / "r.yaml")
    )

    assert result.exit_code == 2
    assert f"error: --dataset builtin-images contains images, but model {model_dir} is text-only" in result.stderr
    assert "use a text dataset such as builtin." in result.stderr


def test_short_dataset_warns_about_fewer_blocks(model_dir, tmp_path, caplog):
    dataset = tmp_path / "small.txt"
    dataset.write_text("".join(f"sample {index} is a short line of calibration text.\n" for index in range(20)))

    with caplog.at_level("WARNING", logger="gemoe_cli.calibration.data"):
        result = runner.invoke(
            app,
            [
                "calibrate", model_dir, "--dataset", str(dataset), "--num-samples", "256", "--seq-len", "32",
                "--device", "cpu", "--target-sparsity", "0.3", "-o", str(tmp_path / "r.yaml"),
            ],
        )  # fmt: skip

    assert result.exit_code == 0, result.output
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "fewer than the 256 blocks (8192 tokens) that --num-samples 256 --seq-len 32 request" in warnings[0]
    assert "add data, or lower --num-samples or --seq-len." in warnings[0]


def test_top_1_model_is_named(tmp_path):
    top_1_dir = tiny_models.save_with_tokenizer(tiny_models.build("olmoe", top_k=1), tmp_path / "top1")

    result = _calibrate(top_1_dir, "--target-sparsity", "0.3", "-o", str(tmp_path / "r.yaml"))

    assert result.exit_code == 2
    assert f"error: model type 'olmoe' ({top_1_dir}) routes each token to its top-1 expert" in result.stderr
    assert "adaptive routing needs a model with top-k of 2 or more" in result.stderr


def test_flags_show_no_bool_metavar():
    result = runner.invoke(app, ["calibrate", "--help"])

    assert result.exit_code == 0
    assert "--per-modality" in result.output
    assert "<bool>" not in result.output
    assert "<float>" in result.output


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


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("target_sparsity: '0.3'", "calibrate.target_sparsity is '0.3' (str); set it to a number between 0 and 1"),
        ("target_sparsity: 1.5", "calibrate.target_sparsity is 1.5 (float); set it to a number between 0 and 1"),
        ("num_samples: '16'", "calibrate.num_samples is '16' (str); set it to an integer of 2 or more"),
        ("num_samples: 16.5", "calibrate.num_samples is 16.5 (float); set it to an integer of 2 or more"),
        ("dataset: 5", "calibrate.dataset is 5 (int); set it to a dataset name or path"),
        ("k_min: true", "calibrate.k_min is True (bool); set it to an integer of 1 or more"),
        ("seed: null", "calibrate.seed is null; set it to an integer, such as 0."),
        ("per_modality: 1", "calibrate.per_modality is 1 (int); set it to true or false."),
        ("policy: greedy", "calibrate.policy is 'greedy' (str); set it to allocated or uniform."),
    ],
)
def test_preset_with_invalid_value(model_dir, tmp_path, setting, shown):
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"calibrate:\n  min_retention: 0.99\n  {setting}\n")

    result = runner.invoke(app, ["calibrate", model_dir, "--recipe", str(preset), "-o", str(tmp_path / "r.yaml")])

    assert result.exit_code == 2
    assert f"error: --recipe {preset}: {shown}" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["preset.yaml"]


def test_shipped_presets_are_valid():
    from pathlib import Path

    from gemoe_cli.cli.calibrate import PRESET_KEYS, _check_preset_values

    presets = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert len(presets) >= 5
    for path in presets:
        data = yaml.safe_load(path.read_text())
        assert set(data["calibrate"]) <= set(PRESET_KEYS), path.name
        _check_preset_values(path, data["calibrate"])
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
