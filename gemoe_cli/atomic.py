"""Atomic outputs: a file or directory appears complete at its final path, or not at all.

Everything is written to a temporary sibling first and renamed into place with `os.replace`, which is
atomic within one file system. On any failure, Ctrl-C included, the temporary is removed and whatever
was at the final path before is left untouched.

Write errors become user-facing errors: a full disk or quota raises `DiskFullError` (exit code 3), and a
path that cannot be written (missing folder, no permission, read-only file system) raises
`InvalidInputError` (exit code 2). Both name the output and the fix.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gemoe_cli.errors import DiskFullError, InvalidInputError, RuntimeFailureError

FULL_DISK_ERRNOS = frozenset(number for number in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if number)

# Errors of the output path itself, which the user fixes by choosing another path.
_PATH_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
)


def is_disk_full(error: BaseException | None) -> bool:
    """Return whether `error`, or an exception it was raised from, reports a full disk or quota.

    Libraries written in Rust (safetensors, tokenizers) raise their own exception types for I/O errors, with
    the operating system's error number only in the text, as ``(os error 28)``.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
            return True
        if any(f"(os error {number})" in str(error) for number in FULL_DISK_ERRNOS):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(what: str, path: Path) -> str:
    """Return the one-line message for an output that did not fit on its file system."""
    return (
        f"cannot write {what} {path}: no space left on device (the disk or the quota is full); free space "
        f"on that file system or choose another output path."
    )


def write_error(error: OSError, what: str, path: Path) -> DiskFullError | InvalidInputError | RuntimeFailureError:
    """Return the user-facing error for an `OSError` raised while writing the output `path`."""
    if is_disk_full(error):
        return DiskFullError(disk_full_message(what, path))
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno in _PATH_ERRNOS:
        return InvalidInputError(f"cannot write {what} {path}: {reason}; choose a writable path.")
    return RuntimeFailureError(f"cannot write {what} {path}: {reason}; check the device, then run the command again.")


@dataclass(frozen=True)
class OutputFile:
    """One file of an atomic write: its final path, its content, and what the error messages call it."""

    path: Path
    content: str | bytes
    what: str = "file"


def _write_content(handle: IO[bytes], content: bytes) -> None:
    handle.write(content)


def write_text_atomically(path: Path, text: str, what: str = "file") -> None:
    """Write `text` to `path` through a temporary sibling, keeping the mode of a file it replaces.

    Raises:
        InvalidInputError: the folder is missing or not writable (`what` names the output in the message).
        DiskFullError: the file system is full.
    """
    write_files_atomically([OutputFile(Path(path), text, what)])


def write_files_atomically(files: Sequence[OutputFile]) -> None:
    """Write several files, each through a temporary sibling, and move them into place only once all are written.

    A failure while writing any of them leaves every final path as it was. Text is written as UTF-8 with
    ``\\n`` line endings.

    NOTE: the renames at the end run one after another, so if a rename fails after an earlier one succeeded,
    the earlier file is already replaced. A rename inside one folder needs no free space, so a full disk
    cannot cause this, but an I/O error of the device can.

    Raises:
        InvalidInputError: a folder is missing or not writable.
        DiskFullError: the file system is full.
    """
    outputs = [(Path(file.path), file) for file in files]
    for path, file in outputs:
        if not path.parent.is_dir():
            raise InvalidInputError(
                f"cannot write {file.what} {path}: folder {path.parent} does not exist; create it first."
            )

    staged: list[tuple[Path, Path, OutputFile]] = []
    try:
        for path, file in outputs:
            temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            staged.append((temporary, path, file))
            _write_temporary(temporary, path, file)
        for temporary, path, file in staged:
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise write_error(error, file.what, path) from error
    finally:
        for temporary, _, _ in staged:
            temporary.unlink(missing_ok=True)


def _write_temporary(temporary: Path, path: Path, file: OutputFile) -> None:
    content = file.content.encode("utf-8") if isinstance(file.content, str) else file.content
    try:
        # Mode "x" creates the file exclusively, with 0o666 minus the umask like a plain open().
        with open(temporary, "xb") as handle:
            _write_content(handle, content)
            handle.flush()
            os.fsync(handle.fileno())
        if path.is_file():
            shutil.copymode(path, temporary)
    except OSError as error:
        raise write_error(error, file.what, path) from error


def check_output_directory(
    path: Path, *, force: bool = False, inputs: Mapping[str, Path] | None = None, what: str = "output directory"
) -> None:
    """Raise `InvalidInputError` when `atomic_directory(path, force=force)` would fail or would delete an input.

    Call it before any expensive work. `inputs` maps a description ("model folder") to a path that the command
    reads; a local input that is `path` itself or lies inside it is rejected, with or without `force`, because
    replacing `path` would delete it. Inputs that do not exist locally (hub ids) are skipped. The parent folder
    is probed by creating and removing an empty directory, so a path that cannot be created (``/proc/x``) fails
    here and not after the model has loaded.

    Raises:
        InvalidInputError: the output would delete an input, exists without `force`, or cannot be written.
    """
    path = Path(path)
    resolved_output = path.resolve()
    for description, input_path in (inputs or {}).items():
        if not Path(input_path).exists():
            continue
        resolved_input = Path(input_path).resolve()
        if resolved_input == resolved_output:
            raise InvalidInputError(
                f"{what} {path} is the {description} {input_path}; choose an output directory outside it."
            )
        if resolved_output in resolved_input.parents:
            raise InvalidInputError(
                f"{what} {path} contains the {description} {input_path}, which replacing it would delete; choose an "
                "output directory that does not contain it."
            )
    _check_directory_path(path, force, what)

    probe = path.parent / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        probe.mkdir()
    except OSError as error:
        raise write_error(error, what, path) from error
    probe.rmdir()


def _check_directory_path(path: Path, force: bool, what: str) -> None:
    if path.exists() and not force:
        raise InvalidInputError(f"{what} {path} already exists; choose another path or pass --force to replace it.")
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} {path} is a file, not a directory; choose another path.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InvalidInputError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose another path.")
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {what} {path}: folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"cannot write {what} {path}: folder {parent} is not writable; choose another path.")


@contextmanager
def atomic_directory(path: Path, *, force: bool = False, what: str = "output directory") -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path`.

    An existing `path` is rejected unless `force` is set, and then it is replaced only after the new
    directory is complete. A full disk while the directory is filled raises `DiskFullError` naming `path`,
    whichever library was writing.

    Raises:
        InvalidInputError: `path` exists without `force`, or its parent folder is missing or not writable.
        DiskFullError: the file system is full.
    """
    path = Path(path)
    _check_directory_path(path, force, what)

    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    try:
        temporary.mkdir()
    except OSError as error:
        raise write_error(error, what, path) from error
    try:
        try:
            yield temporary
        except Exception as error:
            if is_disk_full(error):
                raise DiskFullError(disk_full_message(what, path)) from error
            raise
        try:
            _move_into_place(temporary, path)
        except OSError as error:
            raise write_error(error, what, path) from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _move_into_place(temporary: Path, path: Path) -> None:
    if not path.exists():
        os.replace(temporary, path)
        return
    # Replace in two renames so the old directory stays intact until the new one is complete.
    retired = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
    os.replace(path, retired)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.replace(retired, path)
        raise
    shutil.rmtree(retired, ignore_errors=True)
