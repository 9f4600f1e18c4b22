"""Tests of the root `gemoe` command: help, version, lazy subcommands and exit codes."""

import errno
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from gemoe_cli import __version__
from gemoe_cli.cli.app import app, create_app, main, unwrap_paragraphs
from gemoe_cli.errors import (
    DiskFullError,
    GateFailedError,
    InvalidInputError,
    RecipeMismatchError,
    RuntimeFailureError,
    UnsupportedModelError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

runner = CliRunner()

# Each `raise NAME` command of `failing_app` raises one of these.
FAILURES: dict[str, BaseException] = {
    "invalid-input": InvalidInputError("recipe.yaml is invalid; set k_min to 1 or more."),
    "unsupported-model": UnsupportedModelError("model type 'bert' has no MoE layers."),
    "recipe-mismatch": RecipeMismatchError("the recipe has 16 layers but the model has 24."),
    "gate-failed": GateFailedError("sparsity 0.12 is below --fail-under-sparsity 0.20."),
    "runtime-failure": RuntimeFailureError("onnxruntime failed to load model.onnx."),
    "keyboard-interrupt": KeyboardInterrupt(),
    "unexpected": ValueError("shapes (4, 8) and (16, 2) do not match\nsecond line of detail"),
    "brackets": InvalidInputError("thresholds[i] at [bold] must be finite."),
    "disk-full": DiskFullError("cannot write recipe file r.yaml: no space left on device; free space."),
    "unclassified-disk-full": OSError(errno.ENOSPC, "No space left on device", "/data/cache/blob"),
    "rust-disk-full": RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "memory": MemoryError(),
    "cpu-out-of-memory": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"
    ),
}


def failing_app() -> typer.Typer:
    """Build the real application plus a `raise NAME` command that raises `FAILURES[NAME]`."""
    test_app = create_app()

    @test_app.command("raise")
    def raise_failure(name: str) -> None:
        raise FAILURES[name]

    @test_app.command("exit")
    def exit_with(code: int) -> None:
        raise typer.Exit(code)

    return test_app


def fake_inspect_module(calls: list[str]) -> types.ModuleType:
    """Build a stand-in for `gemoe_cli.cli.inspect` whose command records its MODEL argument."""
    module = types.ModuleType("gemoe_cli.cli.inspect")

    def inspect_command(model: Annotated[str, typer.Argument(help="Local folder or Hub id of the model.")]) -> None:
        """Show a model's MoE layers."""
        calls.append(model)
        if model == "dense-model":
            raise UnsupportedModelError(f"{model} has no MoE layers.")

    module.inspect_command = inspect_command
    return module


def test_help_lists_inspect():
    result = runner.invoke(app, ["--help"])

    assert result.exit_code == 0
    assert "inspect" in result.stdout
    assert "--verbose" in result.stdout
    assert "--version" in result.stdout


def test_unwrap_paragraphs_joins_lines():
    text = "First line\n  wraps here.\n\nSecond paragraph."

    assert unwrap_paragraphs(text) == "First line wraps here.\n\nSecond paragraph."
    assert unwrap_paragraphs(None) is None


def test_command_help_wraps_to_terminal():
    result = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"}, terminal_width=200)

    assert result.exit_code == 0
    assert "Sparsity and retention in the recipe are measured on a held-out part of the data" in result.stdout


def test_short_help_flag():
    result = runner.invoke(app, ["-h"])

    assert result.exit_code == 0
    assert "inspect" in result.stdout


def test_version_prints_version():
    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.stdout.strip() == f"gemoe {__version__}"


def test_unknown_command_is_usage_error():
    result = runner.invoke(app, ["no-such-command"])

    assert result.exit_code == 2
    assert "No such command" in result.stderr


@pytest.mark.parametrize(
    ("name", "exit_code"),
    [
        ("invalid-input", 2),
        ("unsupported-model", 2),
        ("recipe-mismatch", 2),
        ("gate-failed", 1),
        ("runtime-failure", 3),
        ("disk-full", 3),
    ],
)
def test_gemoe_error_exit_code(name, exit_code):
    result = runner.invoke(failing_app(), ["raise", name])

    assert result.exit_code == exit_code
    assert result.stderr.strip() == f"error: {FAILURES[name]}"
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_error_message_keeps_brackets():
    result = runner.invoke(failing_app(), ["raise", "brackets"])

    assert result.exit_code == 2
    assert result.stderr.strip() == "error: thresholds[i] at [bold] must be finite."


def test_keyboard_interrupt_exits_130():
    result = runner.invoke(failing_app(), ["raise", "keyboard-interrupt"])

    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


def test_unexpected_error_exits_3():
    result = runner.invoke(failing_app(), ["raise", "unexpected"])

    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (
        "error: ValueError: shapes (4, 8) and (16, 2) do not match (rerun with --verbose for the traceback)"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "unclassified-disk-full",
            "error: no space left on device while writing /data/cache/blob; free space on that file system or "
            "choose another output path.",
        ),
        (
            "rust-disk-full",
            "error: no space left on device; free space on that file system or choose another output path.",
        ),
        (
            "memory",
            "error: out of memory (MemoryError); use smaller batches or shorter sequences, --dtype bfloat16, "
            "or a device with more memory.",
        ),
        (
            "cpu-out-of-memory",
            "error: out of memory (RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 8 GB); use smaller batches or shorter sequences, "
            "--dtype bfloat16, or a device with more memory.",
        ),
    ],
)
def test_full_disk_and_out_of_memory_name_fix(name, message):
    result = runner.invoke(failing_app(), ["raise", name])

    assert result.exit_code == 3
    assert result.stderr.strip() == message


def test_torch_out_of_memory_names_fix():
    import torch

    def allocate() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    test_app = create_app()
    test_app.command("allocate")(allocate)

    result = runner.invoke(test_app, ["allocate"])

    assert result.exit_code == 3
    assert result.stderr.strip().startswith("error: out of memory (OutOfMemoryError: CUDA out of memory.")
    assert "or a device with more memory." in result.stderr


def test_verbose_prints_traceback():
    result = runner.invoke(failing_app(), ["--verbose", "raise", "unexpected"])

    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "second line of detail" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: ValueError: shapes (4, 8) and (16, 2) do not match"


def test_short_verbose_flag_prints_traceback():
    result = runner.invoke(failing_app(), ["-v", "raise", "invalid-input"])

    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {FAILURES['invalid-input']}"


def test_explicit_exit_code_passes_through():
    result = runner.invoke(failing_app(), ["exit", "4"])

    assert result.exit_code == 4
    assert result.stderr == ""


def test_inspect_loads_module_on_use(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "gemoe_cli.cli.inspect", fake_inspect_module(calls))

    result = runner.invoke(app, ["inspect", "allenai/OLMoE-1B-7B-0924"])

    assert result.exit_code == 0, result.output
    assert calls == ["allenai/OLMoE-1B-7B-0924"]


def test_inspect_help_comes_from_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemoe_cli.cli.inspect", fake_inspect_module([]))

    result = runner.invoke(app, ["inspect", "--help"])

    assert result.exit_code == 0
    assert "Usage: gemoe inspect" in result.stdout
    assert "Local folder or Hub id of the model." in result.stdout


def test_main_maps_error_to_exit_code(monkeypatch, capsys):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "gemoe_cli.cli.inspect", fake_inspect_module(calls))

    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "dense-model"])

    assert exit_info.value.code == 2
    assert calls == ["dense-model"]
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: dense-model has no MoE layers."
    assert captured.out == ""


def run_python(*args: str) -> str:
    """Run a fresh interpreter with `args` on this checkout, and return its stdout."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return completed.stdout


def test_import_skips_torch():
    output = run_python("-c", "import gemoe_cli.cli.app, sys; print('torch' in sys.modules)")

    assert output.strip() == "False"


def test_help_skips_torch_and_transformers():
    code = (
        "import sys\n"
        "from gemoe_cli.cli.app import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )

    output = run_python("-c", code)

    assert output.strip().splitlines()[-1] == "False False"


def test_python_m_prints_version():
    output = run_python("-m", "gemoe_cli", "--version")

    assert output.strip() == f"gemoe {__version__}"
