"""Time exported models in onnxruntime on CPU: prefill and decode time per token, and expert activations.

    python -m gemoe_cli.export.benchmark out/static-onnx out/adaptive-onnx --threads 2 --json timings.json

Each export directory gets one warm-up run and then `repeats` timed runs. A run is a prefill of
`prompt_length` tokens with an empty past, followed by `new_tokens` single-token decode steps on the
growing KV cache. Token ids are random because only time is measured. The table shows min / median /
max of the time per token over runs, and every export is timed in the same process with the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemoe_cli.atomic import write_text_atomically
from gemoe_cli.errors import GemoeError
from gemoe_cli.export import decoder


def _session(path: Path, threads: int | None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            _, heads, _, head_dim = item.shape
            past[item.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return past


def _run_once(session, ids: np.ndarray, new_tokens: int) -> tuple[float, float, int]:
    """Return (prefill seconds, decode seconds, active expert pairs) of one prefill plus decode run."""
    declared = {item.name for item in session.get_inputs()}
    outputs = [item.name for item in session.get_outputs()]
    presents = [name for name in outputs if name.startswith("present.")]
    counts = decoder.EXPERT_ACTIVATIONS in outputs
    requested = presents + ([decoder.EXPERT_ACTIVATIONS] if counts else [])
    batch, length = ids.shape

    past = _empty_past(session, batch)
    active = 0
    prefill = decode = 0.0
    step = ids
    for index in range(new_tokens + 1):
        total = length + index
        feeds = {
            decoder.INPUT_IDS: step,
            decoder.ATTENTION_MASK: np.ones((batch, total), dtype=np.int64),
            decoder.POSITION_IDS: np.arange(total - step.shape[1], total, dtype=np.int64)[None, :].repeat(batch, 0),
            **past,
        }
        start = time.perf_counter()
        values = session.run(requested, {name: value for name, value in feeds.items() if name in declared})
        elapsed = time.perf_counter() - start

        if index == 0:
            prefill = elapsed
        else:
            decode += elapsed
        if counts:
            active += int(values[-1].sum())
        cache = zip(presents, values[: len(presents)], strict=True)
        past = {name.replace("present.", "past_key_values.", 1): value for name, value in cache}
        step = ids[:, index % length : index % length + 1]
    return prefill, decode, active


def time_export(
    directory: Path,
    *,
    prompt_length: int = 32,
    new_tokens: int = 32,
    batch: int = 1,
    repeats: int = 5,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Return the timing record of one export directory (seconds per token, min / median / max)."""
    from gemoe_cli.export.onnx_export import read_metadata

    metadata = read_metadata(Path(directory))
    session = _session(Path(directory) / metadata.get("model_file", "model.onnx"), threads)
    ids = np.random.default_rng(seed).integers(0, metadata["vocab_size"], (batch, prompt_length), dtype=np.int64)
    _run_once(session, ids, new_tokens)  # warm-up

    prefill_times, decode_times, activations = [], [], 0
    for _ in range(repeats):
        prefill, decode, activations = _run_once(session, ids, new_tokens)
        prefill_times.append(prefill / (batch * prompt_length))
        decode_times.append(decode / max(batch * new_tokens, 1))
    tokens = batch * (prompt_length + new_tokens)
    static_pairs = tokens * sum(metadata.get("static_top_k", {}).values())

    def summary(values: list[float]) -> dict:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    record = {
        "directory": str(directory),
        "body": metadata.get("body"),
        "prefill_seconds_per_token": summary(prefill_times),
        "decode_seconds_per_token": summary(decode_times),
        "active_pairs": activations,
        "tokens": tokens,
    }
    if static_pairs and activations:
        record["sparsity"] = 1.0 - activations / static_pairs
    return record


def _format_ms(summary: dict) -> str:
    return " / ".join(f"{summary[key] * 1e3:.3f}" for key in ("min", "median", "max"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time gemoe ONNX exports in onnxruntime on CPU.")
    parser.add_argument("directories", nargs="+", type=Path, help="directories written by gemoe export onnx")
    parser.add_argument("--prompt-length", type=int, default=32, help="prefill tokens per row (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per run (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="rows per run (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)

    try:
        records = [
            time_export(
                directory,
                prompt_length=args.prompt_length,
                new_tokens=args.new_tokens,
                batch=args.batch,
                repeats=args.repeats,
                threads=args.threads,
            )
            for directory in args.directories
        ]
    except GemoeError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print("| export | body | prefill ms/token (min / median / max) | decode ms/token (min / median / max) | sparsity |")
    print("| --- | --- | --- | --- | --- |")
    for record in records:
        sparsity = "n/a" if record.get("sparsity") is None else f"{record['sparsity']:.3f}"
        prefill = _format_ms(record["prefill_seconds_per_token"])
        decode = _format_ms(record["decode_seconds_per_token"])
        print(f"| {Path(record['directory']).name} | {record['body']} | {prefill} | {decode} | {sparsity} |")
    if args.json is not None:
        try:
            write_text_atomically(args.json, json.dumps(records, indent=2) + "\n", what="benchmark JSON")
        except GemoeError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
