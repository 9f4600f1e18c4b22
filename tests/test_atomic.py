"""Atomic writers: a full disk, an interrupt or a failed rename leave the previous output and no temporaries."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import safetensors

import gemoe_cli.atomic as atomic
from gemoe_cli.atomic import (
    OutputFile,
    atomic_directory,
    is_disk_full,
    write_error,
    write_files_atomically,
    write_text_atomically,
)
from gemoe_cli.errors import DiskFullError, InvalidInputError, RuntimeFailureError
from tests.write_faults import FaultyDisk, leftovers, snapshot

NEW_TEXT = "new content\n" * 200


def _assert_full_disk_message(error: DiskFullError, what: str, path: Path) -> None:
    message = str(error)
    assert message.startswith(f"cannot write {what} {path}: no space left on device")
    assert "free space on that file system or choose another output path" in message
    assert "\n" not in message


# --- files --------------------------------------------------------------------------------------------


def test_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text("previous recipe\n")
    disk = FaultyDisk(tmp_path, capacity=100).install(monkeypatch)

    with pytest.raises(DiskFullError) as raised:
        write_text_atomically(path, NEW_TEXT, what="recipe file")

    _assert_full_disk_message(raised.value, "recipe file", path)
    assert raised.value.exit_code == 3
    assert disk.written[0][1] == 100  # the fault came after part of the file was on disk
    assert path.read_text() == "previous recipe\n"
    assert leftovers(tmp_path, {"recipe.yaml"}) == []


def test_full_disk_creates_no_file(tmp_path, monkeypatch):
    FaultyDisk(tmp_path, capacity=10).install(monkeypatch)

    with pytest.raises(DiskFullError):
        write_text_atomically(tmp_path / "report.json", NEW_TEXT, what="report")

    assert leftovers(tmp_path, set()) == []


def test_full_disk_at_fsync(tmp_path, monkeypatch):
    # Some file systems (NFS, quotas) report a full disk only when the data is flushed.
    path = tmp_path / "bench.json"
    path.write_text("{}\n")

    def full_at_flush(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full_at_flush)

    with pytest.raises(DiskFullError, match="no space left on device"):
        write_text_atomically(path, NEW_TEXT, what="benchmark JSON")

    assert path.read_text() == "{}\n"
    assert leftovers(tmp_path, {"bench.json"}) == []


def test_quota_exceeded_is_disk_full(tmp_path, monkeypatch):
    FaultyDisk(tmp_path, capacity=5, error=lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).install(
        monkeypatch
    )

    with pytest.raises(DiskFullError, match="the disk or the quota is full"):
        write_text_atomically(tmp_path / "recipe.yaml", NEW_TEXT, what="recipe file")


def test_interrupt_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text("previous recipe\n")
    FaultyDisk(tmp_path, capacity=50, error=KeyboardInterrupt).install(monkeypatch)

    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, NEW_TEXT, what="recipe file")

    assert path.read_text() == "previous recipe\n"
    assert leftovers(tmp_path, {"recipe.yaml"}) == []


def test_failure_in_second_file_keeps_both(tmp_path, monkeypatch):
    recipe, report = tmp_path / "recipe.yaml", tmp_path / "report.json"
    recipe.write_text("previous recipe\n")
    report.write_text("previous report\n")
    # The recipe fits; the disk fills while the report is written.
    FaultyDisk(tmp_path, capacity=len(NEW_TEXT) + 30).install(monkeypatch)

    with pytest.raises(DiskFullError) as raised:
        write_files_atomically([OutputFile(recipe, NEW_TEXT, "recipe file"), OutputFile(report, NEW_TEXT, "report")])

    _assert_full_disk_message(raised.value, "report", report)
    assert recipe.read_text() == "previous recipe\n"
    assert report.read_text() == "previous report\n"
    assert leftovers(tmp_path, {"recipe.yaml", "report.json"}) == []


def test_several_files_written_together(tmp_path):
    write_files_atomically([OutputFile(tmp_path / "a.txt", "text\n"), OutputFile(tmp_path / "b.png", b"\x89PNG")])

    assert (tmp_path / "a.txt").read_text() == "text\n"
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG"
    assert leftovers(tmp_path, {"a.txt", "b.png"}) == []


def test_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("old\n")
    path.chmod(0o600)

    write_text_atomically(path, "new\n")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "new\n"


def test_missing_folder_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInputError, match=r"folder .*absent does not exist; create it first"):
        write_text_atomically(tmp_path / "absent" / "recipe.yaml", "x", what="recipe file")


@pytest.mark.parametrize(
    ("number", "error_class", "fix"),
    [
        (errno.EACCES, InvalidInputError, "choose a writable path"),
        (errno.EROFS, InvalidInputError, "choose a writable path"),
        (errno.EIO, RuntimeFailureError, "check the device"),
        (errno.ENOSPC, DiskFullError, "free space"),
    ],
)
def test_failed_rename_keeps_previous_file(tmp_path, monkeypatch, number, error_class, fix):
    path = tmp_path / "recipe.yaml"
    path.write_text("previous recipe\n")

    def fail_replace(source, destination):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(atomic.os, "replace", fail_replace)

    with pytest.raises(error_class, match=fix) as raised:
        write_text_atomically(path, NEW_TEXT, what="recipe file")

    assert type(raised.value) is error_class
    assert f"cannot write recipe file {path}" in str(raised.value)
    assert path.read_text() == "previous recipe\n"
    assert leftovers(tmp_path, {"recipe.yaml"}) == []


# --- directories --------------------------------------------------------------------------------------


def _fill(directory: Path, files: int = 3) -> None:
    for number in range(files):
        (directory / f"part-{number}.bin").write_bytes(bytes(1000))


def test_directory_full_disk_leaves_nothing(tmp_path, monkeypatch):
    output = tmp_path / "out"
    FaultyDisk(tmp_path, capacity=1500).install(monkeypatch)

    with pytest.raises(DiskFullError) as raised:
        with atomic_directory(output, what="checkpoint directory") as directory:
            _fill(directory)

    _assert_full_disk_message(raised.value, "checkpoint directory", output)
    assert leftovers(tmp_path, set()) == []


def test_directory_full_disk_keeps_previous(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text('{"previous": true}')
    before = snapshot(output)
    FaultyDisk(tmp_path, capacity=2500).install(monkeypatch)

    with pytest.raises(DiskFullError):
        with atomic_directory(output, force=True) as directory:
            _fill(directory)

    assert snapshot(output) == before
    assert leftovers(tmp_path, {"out"}) == []


def test_directory_safetensors_full_disk(tmp_path):
    # safetensors reports I/O errors as SafetensorError, with the errno only in the message.
    output = tmp_path / "out"

    with pytest.raises(DiskFullError, match="no space left on device"):
        with atomic_directory(output):
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

    assert leftovers(tmp_path, set()) == []


def test_directory_other_error_passes_through(tmp_path):
    with pytest.raises(ValueError, match="bad weights"):
        with atomic_directory(tmp_path / "out") as directory:
            _fill(directory, files=1)
            raise ValueError("bad weights")

    assert leftovers(tmp_path, set()) == []


def test_directory_interrupt_keeps_previous(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "model.onnx").write_bytes(b"previous")
    FaultyDisk(tmp_path, capacity=1500, error=KeyboardInterrupt).install(monkeypatch)

    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(output, force=True) as directory:
            _fill(directory)

    assert snapshot(output) == {"model.onnx": b"previous"}
    assert leftovers(tmp_path, {"out"}) == []


def test_directory_failed_final_rename_restores_previous(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("previous")
    real_replace = os.replace
    calls = []

    def fail_second_rename(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", fail_second_rename)

    with pytest.raises(RuntimeFailureError, match="check the device"):
        with atomic_directory(output, force=True) as directory:
            _fill(directory, files=1)

    assert snapshot(output) == {"config.json": b"previous"}
    assert leftovers(tmp_path, {"out"}) == []


def test_directory_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")

    with pytest.raises(InvalidInputError, match=r"file is a file, not a folder; choose another path"):
        with atomic_directory(tmp_path / "file" / "out"):
            pass


def test_directory_unwritable_parent(tmp_path, monkeypatch):
    # Root writes to any folder, so the refusal of the file system is simulated.
    def deny_mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", deny_mkdir)

    with pytest.raises(InvalidInputError, match="Permission denied; choose a writable path"):
        with atomic_directory(tmp_path / "out"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_directory_read_only_parent(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InvalidInputError, match="is not writable; choose another path"):
            with atomic_directory(folder / "out"):
                pass
    finally:
        folder.chmod(0o755)


# --- classifying errors -------------------------------------------------------------------------------


def test_is_disk_full_follows_causes():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("saving failed") from error
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)

    assert not is_disk_full(RuntimeError("saving failed"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert is_disk_full(RuntimeError(f"I/O error: Disk quota exceeded (os error {errno.EDQUOT})"))


def test_write_error_without_errno():
    error = write_error(OSError("device vanished"), "plot", Path("plot.png"))

    assert isinstance(error, RuntimeFailureError)
    assert str(error) == "cannot write plot plot.png: device vanished; check the device, then run the command again."


# --- checking an output directory before the work -----------------------------------------------------


def test_output_check_rejects_the_input_itself(tmp_path):
    source = tmp_path / "model"
    source.mkdir()

    with pytest.raises(InvalidInputError) as raised:
        atomic.check_output_directory(source, force=True, inputs={"model folder": source})

    assert str(raised.value) == (
        f"output directory {source} is the model folder {source}; choose an output directory outside it."
    )


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("spelling", ["parent", "dot-dot"])
def test_output_check_rejects_a_folder_containing_an_input(tmp_path, force, spelling):
    source = tmp_path / "model"
    source.mkdir()
    output = tmp_path if spelling == "parent" else source / ".."

    with pytest.raises(InvalidInputError) as raised:
        atomic.check_output_directory(output, force=force, inputs={"recipe file": source})

    message = str(raised.value)
    assert message.startswith(f"output directory {output} contains the recipe file {source}")
    assert message.endswith("choose an output directory that does not contain it.")


def test_output_check_accepts_a_sibling_and_skips_hub_ids(tmp_path):
    source = tmp_path / "model"
    source.mkdir()

    atomic.check_output_directory(
        tmp_path / "out", inputs={"model folder": source, "hub model": Path("org/name-that-is-no-folder")}
    )

    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs the Linux /proc file system")
def test_output_check_rejects_uncreatable_path():
    expected = r"^cannot write output directory /proc/gemoe-out: .*; choose a writable path\.$"
    with pytest.raises(InvalidInputError, match=expected):
        atomic.check_output_directory(Path("/proc/gemoe-out"))
