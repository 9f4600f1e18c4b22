"""Options that several commands share, and checks of their values: weight dtypes and output files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from gemoe_cli.errors import InvalidInputError

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Values of `--dtype`; `auto` keeps the dtype stored in the model's config."""

DtypeOption = Annotated[str, typer.Option("--dtype", help=f"Weights dtype: {', '.join(DTYPES)}.")]
IgnoreFingerprintOption = Annotated[
    bool, typer.Option("--ignore-fingerprint", help="Use a recipe fitted on other router weights.")
]
TrustRemoteCodeOption = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own code.")]
AllowPickleOption = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow .bin pickle weights (runs code from the file).")
]

# Data options of the commands that read calibration or evaluation data (calibrate, bench).
DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="builtin (text), builtin-images, a .txt/.jsonl file, a folder of text files or images, or "
        "hf:NAME[:CONFIG][:SPLIT]. Default: builtin-images for vision-language models, builtin otherwise.",
    ),
]
PromptTemplateOption = Annotated[
    str,
    typer.Option(
        "--prompt-template",
        help="Question asked about each image of an image folder; {name} is replaced by the file name.",
    ),
]
MaxImagesOption = Annotated[
    int | None,
    typer.Option("--max-images", help="Maximum number of images in one image+text sample (default: no limit)."),
]


def check_dtype(dtype: str) -> None:
    """Raise `InvalidInputError` unless `dtype` is one of `DTYPES`."""
    if dtype not in DTYPES:
        raise InvalidInputError(f"--dtype {dtype} is unknown; use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}.")


def check_output_file(path: Path, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Check, before any work, that the output file `path` of `option` can be written.

    The folder must exist and accept a new file: a temporary file is created there and removed, which also
    catches read-only file systems and folders such as /proc that `os.access` reports as writable.

    Raises:
        InvalidInputError: `path` is a directory, has a suffix outside `suffixes`, or its folder is missing
            or not writable.
    """
    if path.is_dir():
        raise InvalidInputError(f"{option} {path} is a directory; give a file path.")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{option} {path} has suffix {path.suffix!r}; use {' or '.join(suffixes)}.")
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise InvalidInputError(f"{option} {path}: folder {folder} does not exist; create it first.")
    probe = folder / f".gemoe-write-test.{secrets.token_hex(4)}.tmp"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InvalidInputError(
            f"{option} {path}: folder {folder} is not writable ({reason}); choose another path."
        ) from error
    os.close(descriptor)
    probe.unlink(missing_ok=True)


def check_distinct_outputs(*outputs: tuple[str, Path | None]) -> None:
    """Raise `InvalidInputError` when two of the (option, path) outputs resolve to the same file."""
    seen: dict[Path, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        resolved = path.expanduser().resolve()
        if resolved in seen:
            raise InvalidInputError(
                f"{seen[resolved]} and {option} are both {path}, so one file would overwrite the other; "
                f"give {option} another path."
            )
        seen[resolved] = option
