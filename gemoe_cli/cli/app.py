"""The `gemoe` command line: root options, lazily loaded subcommands and exit codes.

Subcommand modules import torch and transformers, which are slow to import, so the root group imports a
subcommand's module only when that subcommand runs or prints its own help. `gemoe --help` and
`gemoe --version` load neither library.

Every failure inside a subcommand ends with one `error: ...` line on stderr and an exit code:
`GemoeError` subclasses use their `exit_code`, KeyboardInterrupt exits with 130, and any other exception
exits with 3 (a full disk and out of memory get a message with the fix). `--verbose` prints the traceback
before that line.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text
from typer.core import MarkupMode, TyperCommand, TyperGroup
from typer.main import get_command

from gemoe_cli import __version__
from gemoe_cli.errors import GemoeError, RuntimeFailureError

PROGRAM_NAME = "gemoe"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (2), the status shells report after Ctrl-C
LOG_HANDLER_NAME = "gemoe-cli"


@dataclass(frozen=True)
class LazyCommandSpec:
    """A subcommand registered by import path, so its module loads only when the subcommand is used."""

    name: str
    import_path: str  # "package.module:function", a function with typer-annotated parameters
    short_help: str  # shown in `gemoe --help`, which must not import the module


LAZY_COMMANDS: tuple[LazyCommandSpec, ...] = (
    LazyCommandSpec(
        name="inspect",
        import_path="gemoe_cli.cli.inspect:inspect_command",
        short_help="Show a model's MoE layers and whether gemoe supports it.",
    ),
    LazyCommandSpec(
        name="calibrate",
        import_path="gemoe_cli.cli.calibrate:calibrate_command",
        short_help="Fit per-layer entropy thresholds to a sparsity or retention budget and write a recipe.",
    ),
    LazyCommandSpec(
        name="convert",
        import_path="gemoe_cli.cli.convert:convert_command",
        short_help="Rewrite the routers with a recipe and save a loadable checkpoint.",
    ),
    LazyCommandSpec(
        name="bench",
        import_path="gemoe_cli.cli.bench:bench_command",
        short_help="Compare static, gemoe and baseline routing: speed, memory, sparsity and retention.",
    ),
    LazyCommandSpec(
        name="export",
        import_path="gemoe_cli.cli.export:export_command",
        short_help="Export an adaptive model to ONNX (`gemoe export onnx SRC -o DIR`), validated in onnxruntime.",
    ),
)


class LazyCommand(TyperCommand):
    """Placeholder for a subcommand in help listings, which builds the real command when a context is made."""

    def __init__(self, spec: LazyCommandSpec, rich_markup_mode: MarkupMode) -> None:
        super().__init__(spec.name, short_help=spec.short_help, rich_markup_mode=rich_markup_mode)
        self.import_path = spec.import_path
        self._command: TyperCommand | None = None

    def load(self) -> TyperCommand:
        """Import the subcommand's module and build its command from the function (once)."""
        if self._command is None:
            module_name, _, function_name = self.import_path.partition(":")
            function = getattr(importlib.import_module(module_name), function_name)
            single = typer.Typer(add_completion=False, rich_markup_mode=self.rich_markup_mode)
            single.command(self.name)(function)
            self._command = get_command(single)
            self._command.help = unwrap_paragraphs(self._command.help)
            hide_flag_metavars(self._command)
        return self._command

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        # The group invokes `sub_ctx.command`, so the real command runs and prints its own help.
        return self.load().make_context(info_name, args, parent=parent, **extra)


def hide_flag_metavars(command: TyperCommand) -> None:
    """Show no value placeholder for boolean flags in help, since they take no value.

    typer 0.29 shows the type of every option, so flags such as --help read ``<bool>`` as if they took one.
    """
    for param in command.params:
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""
    make_help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option  # type: ignore[method-assign]


def unwrap_paragraphs(text: str | None) -> str | None:
    """Join the wrapped lines of each paragraph of a docstring, so that help wraps to the terminal width.

    Rich help keeps single line breaks, which would otherwise cut lines at the docstring's width.
    """
    if not text:
        return text
    paragraphs = text.strip().split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


class RootGroup(TyperGroup):
    """The `gemoe` group: adds the lazy subcommands and turns their exceptions into exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for spec in LAZY_COMMANDS:
            if spec.name not in self.commands:
                self.add_command(LazyCommand(spec, self.rich_markup_mode))

    def invoke(self, ctx: Any) -> Any:
        verbose = bool(ctx.params.get("verbose", False))
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            # Exit codes, aborts and usage errors that typer reports itself.
            raise
        except GemoeError as error:
            report_failure(f"error: {error}", error, verbose)
            raise typer.Exit(error.exit_code) from error
        except KeyboardInterrupt as error:
            report_failure("interrupted", error, verbose)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from error
        except Exception as error:
            report_failure(unclassified_failure_message(error, verbose), error, verbose)
            raise typer.Exit(RuntimeFailureError.exit_code) from error


def unclassified_failure_message(error: Exception, verbose: bool) -> str:
    """Return the error line for an exception that is not a `GemoeError`.

    A full disk and running out of memory get their fix; any other exception is named with the first line
    of its message.
    """
    from gemoe_cli.atomic import is_disk_full

    text = first_line(str(error))
    detail = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if is_disk_full(error):
        written = f" while writing {error.filename}" if isinstance(error, OSError) and error.filename else ""
        return f"error: no space left on device{written}; free space on that file system or choose another output path."
    if is_out_of_memory(error):
        return (
            f"error: out of memory ({detail}); use smaller batches or shorter sequences, --dtype bfloat16, "
            "or a device with more memory."
        )
    message = f"error: {detail}"
    if not verbose:
        message += " (rerun with --verbose for the traceback)"
    return message


def is_out_of_memory(error: BaseException) -> bool:
    """Return whether `error` reports an allocation failure: MemoryError, or torch out of memory on any device."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # imported by the command that failed, if it allocates tensors
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory").
    text = first_line(str(error)).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def first_line(text: str) -> str:
    """Return the first non-empty line of `text`, so a multi-line exception message fits one line."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def report_failure(message: str, error: BaseException, verbose: bool) -> None:
    """Print `message` as one line on stderr, after the traceback of `error` when `verbose` is set."""
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    # soft_wrap keeps the message on one line, and Text prints brackets literally instead of as rich markup.
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print(Text(message, style="bold red" if message.startswith("error:") else "yellow"))


def configure_logging(verbose: bool) -> None:
    """Send `gemoe_cli` log records to stderr through rich: INFO and above with `--verbose`, else WARNING."""
    logger = logging.getLogger("gemoe_cli")
    if not any(handler.name == LOG_HANDLER_NAME for handler in logger.handlers):
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.name = LOG_HANDLER_NAME
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def print_version(value: bool) -> None:
    if value:
        print(f"{PROGRAM_NAME} {__version__}")
        raise typer.Exit()


def create_app() -> typer.Typer:
    """Build the `gemoe` Typer application with its root options and lazy subcommands."""
    app = typer.Typer(
        name=PROGRAM_NAME,
        cls=RootGroup,
        help=(
            "Rewrite the routers of Mixture-of-Experts models so each token engages a number of experts "
            "chosen from the entropy of its gating distribution."
        ),
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(
        version: Annotated[
            bool,
            typer.Option("--version", help="Print the version and exit.", callback=print_version, is_eager=True),
        ] = False,
        verbose: Annotated[
            bool,
            typer.Option("--verbose", "-v", help="Log progress at INFO level and print the traceback of a failure."),
        ] = False,
    ) -> None:
        configure_logging(verbose)

    return app


app = create_app()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the `gemoe` command line with `argv` (default: `sys.argv[1:]`) and exit with its exit code."""
    command = get_command(app)
    hide_flag_metavars(command)
    command.main(args=argv, prog_name=PROGRAM_NAME)
