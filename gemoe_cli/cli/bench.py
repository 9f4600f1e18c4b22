"""`gemoe bench MODEL_OR_DIR`: static, gemoe and baseline policies side by side on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemoe_cli.bench.settings import DEFAULTS, METRICS, BenchSettings
from gemoe_cli.calibration.images import DEFAULT_PROMPT_TEMPLATE
from gemoe_cli.cli.calibrate import DEFAULT_HELDOUT_FRACTION, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from gemoe_cli.cli.options import (
    AllowPickleOption,
    DatasetOption,
    DtypeOption,
    IgnoreFingerprintOption,
    MaxImagesOption,
    PromptTemplateOption,
    TrustRemoteCodeOption,
    check_distinct_outputs,
    check_dtype,
    check_output_file,
)
from gemoe_cli.errors import GateFailedError, InvalidInputError

PLOT_SWEEP_POINTS = 7
"""Default points per policy on the sweep that `--plot` draws; odd, so gemoe's unshifted recipe is one of them."""


def _check_output(path: Path | None, option: str, suffixes: tuple[str, ...]) -> None:
    if path is not None:
        check_output_file(path, option, suffixes)


def _check_gate(option: str, value: float | None) -> None:
    if value is not None and not value > 0:  # also rejects NaN
        raise InvalidInputError(f"{option} {value} is invalid; pass a positive ratio such as 0.99.")


def bench_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_OR_DIR",
            help="Hugging Face hub id or local model directory with --recipe, or a directory from gemoe convert.",
        ),
    ],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe file (.yaml or .json); default: the converted config.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the full record to this JSON file.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write retention-vs-sparsity and k-histogram plots (PNG).")
    ] = None,
    prefill_batch_size: Annotated[
        int,
        typer.Option("--prefill-batch-size", help="Prompts per prefill pass (image+text prompts run one at a time)."),
    ] = DEFAULTS.prefill_batch_size,
    prompt_len: Annotated[
        int, typer.Option("--prompt-len", help="Tokens per prompt (text data; image+text prompts keep theirs).")
    ] = DEFAULTS.prompt_len,
    decode_batch_size: Annotated[
        int,
        typer.Option(
            "--decode-batch-size", help="Sequences generated together (image+text prompts: one after another)."
        ),
    ] = DEFAULTS.decode_batch_size,
    gen_len: Annotated[int, typer.Option("--gen-len", help="New tokens per sequence (greedy).")] = DEFAULTS.gen_len,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed runs per policy and phase (5 or more).")
    ] = DEFAULTS.repeats,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per policy first.")] = DEFAULTS.warmup,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help=f"Retention metric: {', '.join(METRICS)} (exact_match compares greedy answers; image+text data only).",
        ),
    ] = DEFAULTS.metric,
    dataset: DatasetOption = None,
    prompt_template: PromptTemplateOption = DEFAULT_PROMPT_TEMPLATE,
    max_images: MaxImagesOption = None,
    skip_bad_samples: Annotated[
        bool,
        typer.Option(
            "--skip-bad-samples",
            help="Leave out samples that cannot be used (missing image, too many images, ...) and count them.",
        ),
    ] = False,
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples", help="Token blocks or image+text samples (as calibrate; the held-out part is evaluated)."
        ),
    ] = DEFAULT_NUM_SAMPLES,
    seq_len: Annotated[
        int, typer.Option("--seq-len", help="Tokens per evaluation block (text data; image+text samples keep theirs).")
    ] = DEFAULT_SEQ_LEN,
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of blocks in the held-out evaluation set.")
    ] = DEFAULT_HELDOUT_FRACTION,
    eval_batch_size: Annotated[
        int,
        typer.Option("--eval-batch-size", help="Evaluation blocks per forward pass (image+text: one sample each)."),
    ] = DEFAULTS.eval_batch_size,
    profile_moe: Annotated[
        bool, typer.Option("--profile-moe", help="Also time MoE blocks and routing in extra synchronised runs.")
    ] = DEFAULTS.profile_moe,
    sweep_points: Annotated[
        int, typer.Option("--sweep-points", help="Points per policy on the --plot sweep.")
    ] = PLOT_SWEEP_POINTS,
    fail_under_retention: Annotated[
        float | None, typer.Option("--fail-under-retention", help="Exit 1 if gemoe's retention is below this.")
    ] = None,
    fail_under_speedup: Annotated[
        float | None,
        typer.Option("--fail-under-speedup", help="Exit 1 if gemoe's decode tokens/s over static is below this."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data split and torch.")] = DEFAULTS.seed,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's own choice).")
    ] = None,
    ignore_fingerprint: IgnoreFingerprintOption = False,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Measure static, gemoe and baseline routing on the same inputs: speed, memory, sparsity, retention.

    Policies: static_native (no gemoe), static (gemoe's path with every token at K experts), gemoe, and
    top_p, ratio_skip (both calibrated to gemoe's sparsity on the evaluation set) and static_k_minus_1.
    Vision-language models run on image+text samples prepared by their own processor and chat template.
    Gates exit with 1 after the JSON is written.
    """
    settings = BenchSettings(
        prefill_batch_size=prefill_batch_size,
        prompt_len=prompt_len,
        decode_batch_size=decode_batch_size,
        gen_len=gen_len,
        repeats=repeats,
        warmup=warmup,
        metric=metric,
        eval_batch_size=eval_batch_size,
        profile_moe=profile_moe,
        sweep_points=sweep_points if plot is not None else 0,
        seed=seed,
    )
    check_dtype(dtype)
    if max_images is not None and max_images < 1:
        raise InvalidInputError(f"--max-images {max_images} is invalid; use 1 or more.")
    if not 0.0 < heldout_fraction < 1.0:
        raise InvalidInputError(f"--heldout-fraction {heldout_fraction} is outside (0, 1); use e.g. 0.2.")
    _check_gate("--fail-under-retention", fail_under_retention)
    _check_gate("--fail-under-speedup", fail_under_speedup)
    _check_output(json_path, "--json", (".json",))
    _check_output(plot, "--plot", (".png",))
    check_distinct_outputs(("--json", json_path), ("--plot", plot))

    from rich.console import Console

    from gemoe_cli.bench.report import check_gates, render_tables, require_matplotlib, write_outputs

    if plot is not None:
        require_matplotlib()

    from gemoe_cli.bench.pipeline import run_bench

    errors = Console(stderr=True, highlight=False)
    record = run_bench(
        model,
        recipe_path=recipe,
        settings=settings,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        heldout_fraction=heldout_fraction,
        device=device,
        dtype=dtype,
        ignore_fingerprint=ignore_fingerprint,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        threads=threads,
        progress=lambda message: errors.print(f"[dim]{message}[/dim]"),
        prompt_template=prompt_template,
        max_images=max_images,
        skip_bad_samples=skip_bad_samples,
    )

    failures = check_gates(record, fail_under_retention, fail_under_speedup)
    write_outputs(record, json_path, plot)
    render_tables(record, Console(soft_wrap=False))
    written = [str(path) for path in (json_path, plot) if path is not None]
    if written:
        errors.print(f"written: {', '.join(written)}")
    if failures:
        raise GateFailedError("; ".join(failures) + ".")
