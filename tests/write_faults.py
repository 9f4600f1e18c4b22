"""Write faults for tests: a full disk, or an exception, part way through a file that gemoe writes.

`FaultyDisk(folder, capacity)` patches `open` so that files opened for writing under `folder` share a budget of
`capacity` bytes (characters for text files). With `file` set, only writes to files of that name count, from
the `occurrence`-th time that file is opened, so a file written twice (export metadata) can fail the second time.
The write that crosses the budget stores the part that still fits, flushes it and raises `error()`, by default
`OSError(ENOSPC)` as a write to a full file system does. With `capacity=None` nothing fails, and the run records
which files were written and how much, so a test can then place a fault inside each of them (`fault_points`).

Safetensors weights are written by the Rust library, outside Python's `open`. `install` routes transformers'
`safe_save_file` through the patched `open` and turns an `OSError` into the `SafetensorError` that the library
raises for a real I/O error. Files that other native code writes (the tokenizers library's ``tokenizer.json``)
are not covered.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest


def disk_full() -> OSError:
    """Return the error a write to a full file system raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FaultyDisk:
    """A file system under `folder` that takes `capacity` bytes, then raises `error()` from the failing write."""

    def __init__(
        self,
        folder: Path,
        capacity: int | None = None,
        error: Callable[[], BaseException] = disk_full,
        file: str | None = None,
        occurrence: int = 1,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.remaining = capacity
        self.error = error
        self.file = file
        self.occurrence = occurrence
        # (file name, bytes) in the order the files were opened; a temporary sibling counts under its final name.
        self.written: list[tuple[str, int]] = []
        self.failed: list[str] = []  # names of the files whose write raised

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FaultyDisk:
        real_open = builtins.open

        def patched_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(flag in mode for flag in "wax+") and self._watches(file):
                return _LimitedFile(handle, self, _output_name(Path(os.fsdecode(file)).name))
            return handle

        monkeypatch.setattr(builtins, "open", patched_open)
        monkeypatch.setattr(io, "open", patched_open)
        _route_safetensors_through_open(monkeypatch)
        return self

    def _watches(self, file) -> bool:
        if isinstance(file, int):
            return False
        return Path(os.path.abspath(os.fsdecode(file))).resolve().is_relative_to(self.folder)


def _output_name(name: str) -> str:
    """Return the final name of a file that `gemoe_cli.atomic` writes as a temporary sibling first."""
    match = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", name)
    return match.group(1) if match else name


class _LimitedFile:
    """A file object whose writes count against the disk's budget; everything else goes to the real file."""

    def __init__(self, handle, disk: FaultyDisk, name: str) -> None:
        self._handle = handle
        self._disk = disk
        self._name = name
        self._index = len(disk.written)
        disk.written.append((name, 0))
        self._targeted = name == disk.file and [item for item, _ in disk.written].count(name) >= disk.occurrence

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        disk = self._disk
        if disk.file is not None and not self._targeted:
            self._count(size)
            return self._handle.write(data)
        if disk.remaining is None or size <= disk.remaining:
            if disk.remaining is not None:
                disk.remaining -= size
            self._count(size)
            return self._handle.write(data)
        fitting = disk.remaining
        if fitting:
            part = data[:fitting] if isinstance(data, str) else bytes(memoryview(data).cast("B")[:fitting])
            self._handle.write(part)
            self._handle.flush()
            self._count(fitting)
        disk.remaining = 0
        disk.failed.append(self._name)
        raise disk.error()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _count(self, size: int) -> None:
        name, total = self._disk.written[self._index]
        self._disk.written[self._index] = (name, total + size)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _route_safetensors_through_open(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch
    import transformers.modeling_utils

    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        try:
            with open(filename, "wb") as handle:
                handle.write(data)
        except OSError as error:
            # The message format of safetensors 0.8 for an I/O error while writing a file.
            raise safetensors.SafetensorError(
                f"Error while serializing: I/O error: {error.strerror} (os error {error.errno})"
            ) from None

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def fault_points(written: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Return one (file name, capacity) per written file: a budget that runs out half way through that file."""
    points, before = [], 0
    for name, size in written:
        if size > 0:
            points.append((name, before + size // 2))
        before += size
    return points


def leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Return the names in `folder` other than `expected`: temporary siblings and partial outputs."""
    return sorted(path.name for path in Path(folder).iterdir() if path.name not in expected)


def snapshot(path: Path) -> dict[str, bytes]:
    """Return the content of a file, or of every file under a directory, keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(item.relative_to(path)): item.read_bytes() for item in sorted(path.rglob("*")) if item.is_file()}
