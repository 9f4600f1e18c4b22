"""Atomic outputs: a file or directory appears complete at its final path, or not at all.

Everything is written to a temporary sibling first and renamed into place with `os.replace`, which is
atomic within one file system. On any failure, Ctrl-C included, the temporary is removed and whatever
was at the final path before is left untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from gemoe_cli.errors import InvalidInputError


def _write_text(handle: IO[str], text: str) -> None:
    handle.write(text)


def write_text_atomically(path: Path, text: str, what: str = "file") -> None:
    """Write `text` to `path` through a temporary sibling, keeping the mode of a file it replaces.

    Raises:
        InvalidInputError: the folder is missing or not writable (`what` names the output in the message).
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InvalidInputError(f"cannot write {what} {path}: folder {folder} does not exist; create it first.")

    temporary = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    created = False
    try:
        try:
            # 0o666 minus the umask, the mode a plain open() would give a new file.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
            with open(descriptor, "w", encoding="utf-8", newline="\n") as handle:
                _write_text(handle, text)
                handle.flush()
                os.fsync(handle.fileno())
            if path.is_file():
                shutil.copymode(path, temporary)
            os.replace(temporary, path)
        except BaseException:
            if created:
                temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        reason = error.strerror or error
        raise InvalidInputError(f"cannot write {what} {path}: {reason}; choose a writable path.") from error


@contextmanager
def atomic_directory(path: Path, *, force: bool = False, what: str = "output directory") -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path`.

    An existing `path` is rejected unless `force` is set, and then it is replaced only after the new
    directory is complete.

    Raises:
        InvalidInputError: `path` exists without `force`, or its parent folder is missing or not writable.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InvalidInputError(f"{what} {path} already exists; choose another path or pass --force to replace it.")
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} {path} is a file, not a directory; choose another path.")
    parent = path.parent
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {what} {path}: folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"cannot write {what} {path}: folder {parent} is not writable; choose another path.")

    temporary = parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    temporary.mkdir()
    try:
        yield temporary
        if path.exists():
            # Replace in two renames so the old directory stays intact until the new one is complete.
            retired = parent / f".{path.name}.{secrets.token_hex(4)}.old"
            os.replace(path, retired)
            os.replace(temporary, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
