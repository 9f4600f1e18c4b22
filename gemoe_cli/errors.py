"""User-facing errors and the exit codes the CLI maps them to.

Every error a user can fix is a `GemoeError` with a one-line message that names the offending value and
the fix. The CLI prints the message and exits with the class's `exit_code`; `--verbose` adds the traceback.
"""


class GemoeError(Exception):
    """Base class of the errors the CLI reports without a traceback."""

    exit_code = 3


class GateFailedError(GemoeError):
    """A CI gate (`--fail-under-*`) was not met."""

    exit_code = 1


class InvalidInputError(GemoeError):
    """An argument, file or recipe is invalid."""

    exit_code = 2


class UnsupportedModelError(InvalidInputError):
    """The model has no MoE layers, or its family cannot route adaptively."""


class RecipeMismatchError(InvalidInputError):
    """A recipe does not describe the model it is applied to."""


class RuntimeFailureError(GemoeError):
    """A step failed while running (out of memory, a backend error)."""

    exit_code = 3


class DiskFullError(RuntimeFailureError):
    """An output did not fit: the file system is full or the user's quota is reached."""
