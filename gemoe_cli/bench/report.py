"""The benchmark record: build it from measurements, check targets and gates, write JSON, render tables, plot.

The record's fields are documented in docs/bench.md; `SCHEMA_VERSION` changes whenever a field is renamed,
removed or changes meaning.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemoe_cli import __version__
from gemoe_cli.atomic import OutputFile, write_files_atomically, write_text_atomically
from gemoe_cli.errors import InvalidInputError

if TYPE_CHECKING:
    from gemoe_cli.bench.runner import PolicyRun
    from gemoe_cli.bench.settings import BenchSettings

SCHEMA_VERSION = 1

STATIC_REFERENCE = (
    "static: every threshold -inf and k_max = K, routed through gemoe's router hooks, route step and the "
    "gemoe_sparse experts implementation, so it differs from the adaptive policies only in k"
)

# Performance targets of gemoe, reported with every record that measures them.
MOE_TIME_FACTOR = 0.8
"""MoE-layer time should fall by at least this fraction of the sparsity."""
DECODE_SPEEDUP_TARGET = 1.2
"""End-to-end decode tokens/s of gemoe over static."""
ROUTING_OVERHEAD_TARGET = 0.03
"""Time in `route` over time in MoE blocks, at most."""

PLOT_EXTRA_HINT = "pip install 'gemoe[plot]' (or pip install matplotlib)"


def summarize(values: list[float]) -> dict | None:
    """Return ``{"min", "median", "max", "values"}``, or None for no values."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": list(values)}


def _median(stats: dict | None) -> float | None:
    return None if stats is None else stats["median"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def environment(device) -> dict:
    """Describe the software and hardware the benchmark ran on."""
    import torch
    import transformers

    record = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": None,
        "load_average_end": load_average(),
    }
    if device.type == "cuda":
        record["gpu_name"] = torch.cuda.get_device_name(device)
    return record


def load_average() -> list[float] | None:
    """Return the 1-, 5- and 15-minute load averages, or None where the platform has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _phase_profile(profile: dict | None) -> dict | None:
    if profile is None:
        return None
    moe_total = sum(profile["moe"])
    wall_total = sum(profile["wall"])
    route_total = sum(profile["route"]) if profile["route"] else None
    return {
        "moe_seconds": summarize(profile["moe"]),
        "route_seconds": summarize(profile["route"]),
        "run_seconds": summarize(profile["wall"]),
        "moe_fraction": _ratio(moe_total, wall_total),
        "routing_overhead": _ratio(route_total, moe_total),
    }


def _per_second(amount: int, runs: list[float]) -> dict | None:
    return summarize([amount / seconds for seconds in runs]) if amount else None


def _policy_record(run: PolicyRun, settings: BenchSettings, inputs: dict) -> dict:
    image_text = inputs["kind"] == "image+text"
    prompt_len = None if image_text else settings.prompt_len
    prefill_tokens = sum(inputs["prefill_prompt_tokens"])
    prefill_sequences = len(inputs["prefill_prompt_tokens"])
    decode_sequences = len(inputs["decode_prompt_tokens"])
    decode_tokens = decode_sequences * run.decode_steps
    # Batched token prompts generate their sequences in parallel. Image+text prompts run one after another,
    # so the time per token of one sequence is the run's time over all the tokens it generated.
    sequential_steps = inputs["decode_passes"] * run.decode_steps
    memory = {phase: usage for phase, usage in run.memory.items()}
    evaluation = run.evaluation
    record = {
        "description": run.policy.description,
        "parameter": run.policy.parameter,
        "calibration": run.policy.calibration,
        "retention": None if evaluation is None else evaluation["retention"][settings.metric],
        "evaluation": evaluation,
        "prefill": {
            "batch_size": prefill_sequences,
            "prompt_len": prompt_len,
            "passes": inputs["prefill_passes"],
            "tokens": prefill_tokens,
            "images": inputs["prefill_images"],
            "seconds": summarize(run.prefill_seconds),
            "tokens_per_second": summarize([prefill_tokens / seconds for seconds in run.prefill_seconds]),
            "samples_per_second": _per_second(prefill_sequences, run.prefill_seconds),
            "images_per_second": _per_second(inputs["prefill_images"], run.prefill_seconds),
            "sparsity": None if run.prefill_tally is None else run.prefill_tally.to_json(),
            "peak_memory_bytes": memory["prefill"].peak_bytes if "prefill" in memory else None,
            "peak_memory_increase_bytes": memory["prefill"].increase_bytes if "prefill" in memory else None,
            "profile": _phase_profile(None if run.profile is None else run.profile["prefill"]),
        },
        "decode": {
            "batch_size": decode_sequences,
            "prompt_len": prompt_len,
            "passes": inputs["decode_passes"],
            "new_tokens": settings.gen_len,
            "timed_steps": run.decode_steps,
            "first_token_seconds": summarize(run.first_token_seconds),
            "seconds": summarize(run.decode_seconds),
            "tokens_per_second": summarize([decode_tokens / seconds for seconds in run.decode_seconds]),
            "seconds_per_token": summarize([seconds / max(sequential_steps, 1) for seconds in run.decode_seconds]),
            "sparsity": None if run.decode_tally is None else run.decode_tally.to_json(),
            "peak_memory_bytes": memory["decode"].peak_bytes if "decode" in memory else None,
            "peak_memory_increase_bytes": memory["decode"].increase_bytes if "decode" in memory else None,
            "profile": _phase_profile(None if run.profile is None else run.profile["decode"]),
        },
    }
    record.update(run.policy.extra)
    record.update(run.extra)
    return record


def _add_speedups(policies: dict[str, dict]) -> None:
    for phase in ("prefill", "decode"):
        static = _median(policies["static"][phase]["tokens_per_second"])
        native = _median(policies["static_native"][phase]["tokens_per_second"])
        for record in policies.values():
            own = _median(record[phase]["tokens_per_second"])
            record[phase]["speedup_vs_static"] = _ratio(own, static)
            record[phase]["speedup_vs_native"] = _ratio(own, native)


def evaluate_targets(policies: dict[str, dict]) -> dict:
    """Check gemoe against the performance targets; a target whose inputs were not measured is None."""
    gemoe = policies["gemoe"]
    static = policies["static"]
    speedup = gemoe["decode"]["speedup_vs_static"]
    targets: dict[str, Any] = {
        "decode_speedup": {
            "measured": speedup,
            "required_min": DECODE_SPEEDUP_TARGET,
            "met": None if speedup is None else speedup >= DECODE_SPEEDUP_TARGET,
        },
        "moe_time_reduction": None,
        "routing_overhead": None,
    }
    if gemoe["prefill"]["profile"] is None or static["prefill"]["profile"] is None:
        return targets

    targets["moe_time_reduction"] = {}
    targets["routing_overhead"] = {}
    for phase in ("prefill", "decode"):
        gemoe_moe = _median(gemoe[phase]["profile"]["moe_seconds"])
        static_moe = _median(static[phase]["profile"]["moe_seconds"])
        reduction = None if not static_moe else 1.0 - gemoe_moe / static_moe
        sparsity = (gemoe[phase]["sparsity"] or {}).get("overall")
        required = None if sparsity is None else MOE_TIME_FACTOR * sparsity
        targets["moe_time_reduction"][phase] = {
            "measured": reduction,
            "sparsity": sparsity,
            "required_min": required,
            "met": None if reduction is None or required is None else reduction >= required,
        }
        overhead = gemoe[phase]["profile"]["routing_overhead"]
        targets["routing_overhead"][phase] = {
            "measured": overhead,
            "required_max": ROUTING_OVERHEAD_TARGET,
            "met": None if overhead is None else overhead <= ROUTING_OVERHEAD_TARGET,
        }
    return targets


def build_record(
    *,
    identity: dict,
    spec,
    inputs: dict,
    settings: BenchSettings,
    runs: list[PolicyRun],
    sweep: dict | None,
    device,
    memory_method: str,
    dtype: str,
    load_average_start: list[float] | None = None,
) -> dict:
    """Assemble the JSON record of one benchmark from the runner's measurements."""
    policies = {run.policy.name: _policy_record(run, settings, inputs) for run in runs}
    _add_speedups(policies)
    gemoe = policies["gemoe"]
    modalities = gemoe["evaluation"]["sparsity"]["modalities"]
    summary = {
        "metric": settings.metric,
        "gemoe_retention": gemoe["retention"],
        "gemoe_sparsity": gemoe["evaluation"]["sparsity"]["overall"],
        "gemoe_modality_sparsity": (
            None if modalities is None else {name: entry["sparsity"] for name, entry in modalities.items()}
        ),
        "gemoe_exact_match": gemoe["evaluation"].get("exact_match"),
        "gemoe_prefill_speedup": gemoe["prefill"]["speedup_vs_static"],
        "gemoe_decode_speedup": gemoe["decode"]["speedup_vs_static"],
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": f"gemoe {__version__}",
        "model": identity,
        "routing": spec.to_json(),
        "environment": {**environment(device), "dtype": dtype, "load_average_start": load_average_start},
        "settings": asdict(settings),
        "inputs": inputs,
        "data": None,
        "static_reference": STATIC_REFERENCE,
        "memory_method": memory_method,
        "policies": policies,
        "summary": summary,
        "targets": evaluate_targets(policies),
        "sweep": sweep,
        "gates": [],
        "seconds_total": None,
    }


# --- gates -------------------------------------------------------------------------------------------


def check_gates(record: dict, fail_under_retention: float | None, fail_under_speedup: float | None) -> list[str]:
    """Record each requested gate in `record["gates"]` and return the messages of those that failed."""
    gemoe = record["policies"]["gemoe"]
    metric = record["settings"]["metric"]
    checks = []
    if fail_under_retention is not None:
        checks.append(("--fail-under-retention", f"{metric} retention", gemoe["retention"], fail_under_retention))
    if fail_under_speedup is not None:
        measured = gemoe["decode"]["speedup_vs_static"]
        checks.append(("--fail-under-speedup", "decode speedup over static", measured, fail_under_speedup))

    failures = []
    for option, name, measured, required in checks:
        passed = measured is not None and measured >= required
        record["gates"].append({"option": option, "measured": measured, "required_min": required, "passed": passed})
        if not passed:
            measured_text = "not measured" if measured is None else f"{measured:.4f}"
            failures.append(f"gemoe {name} {measured_text} is below {option} {required}")
    return failures


# --- JSON --------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    """Replace NaN and infinities with None, so the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def record_to_json(record: dict) -> str:
    return json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n"


def write_json(record: dict, path: Path) -> None:
    """Write the record to `path` atomically."""
    write_text_atomically(Path(path), record_to_json(record), what="benchmark JSON")


def write_outputs(record: dict, json_path: Path | None, plot_path: Path | None) -> None:
    """Write the JSON record and the plot, each optional, replacing both files together or neither."""
    outputs = []
    if json_path is not None:
        outputs.append(OutputFile(Path(json_path), record_to_json(record), "benchmark JSON"))
    if plot_path is not None:
        outputs.append(OutputFile(Path(plot_path), plot_png(record), "plot"))
    write_files_atomically(outputs)


# --- tables ------------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(stats: dict | None, digits: int = 1) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def _modalities_seen(policies: dict) -> list[str]:
    """Return the token modalities in any policy's evaluation sparsity, in the order of their first appearance."""
    seen: dict[str, None] = {}
    for policy in policies.values():
        evaluation = policy["evaluation"]
        if evaluation is not None:
            seen.update(dict.fromkeys(evaluation["sparsity"].get("modalities") or {}))
    return list(seen)


def _memory(phase: dict) -> str:
    peak, increase = phase["peak_memory_bytes"], phase["peak_memory_increase_bytes"]
    if peak is None:
        return "-"
    return f"{peak / 2**20:.1f} (+{increase / 2**20:.1f})"


def _sparsity(section: dict | None) -> str:
    return "-" if section is None else _number(section["overall"])


def _policy_column(table) -> None:
    table.add_column("policy", no_wrap=True, min_width=len("static_k_minus_1"))


def render_tables(record: dict, console) -> None:
    """Print the quality, speed and memory tables and the performance targets to a rich console."""
    from rich.table import Table

    metric = record["settings"]["metric"]
    settings = record["settings"]
    policies = record["policies"]

    inputs = record["inputs"]
    image_text = inputs.get("kind") == "image+text"
    modalities = _modalities_seen(policies)
    exact_match = any((policy["evaluation"] or {}).get("exact_match") is not None for policy in policies.values())

    if image_text:
        amount = f"{inputs['eval_blocks']} image+text evaluation sample" + ("" if inputs["eval_blocks"] == 1 else "s")
    else:
        amount = f"{inputs['eval_tokens']} evaluation tokens"
    quality = Table(title=f"quality and sparsity ({amount})")
    _policy_column(quality)
    columns = ["parameter", f"retention ({metric})"]
    columns += ["exact match"] if exact_match and metric != "exact_match" else []
    columns += ["sparsity eval", *(f"eval {name}" for name in modalities), "sparsity prefill", "sparsity decode"]
    for column in columns:
        quality.add_column(column, justify="left" if column == "parameter" else "right")
    for name, policy in policies.items():
        parameter = policy["parameter"]
        evaluation = policy["evaluation"]
        row = [
            name,
            "-" if parameter is None else f"{parameter['name']}={parameter['value']:.4g}",
            _number(policy["retention"]),
        ]
        if exact_match and metric != "exact_match":
            row.append("-" if evaluation is None else _number(evaluation.get("exact_match")))
        row.append("-" if evaluation is None else _number(evaluation["sparsity"]["overall"]))
        for modality in modalities:
            entry = None if evaluation is None else (evaluation["sparsity"]["modalities"] or {}).get(modality)
            row.append("-" if entry is None else _number(entry["sparsity"]))
        row += [_sparsity(policy["prefill"]["sparsity"]), _sparsity(policy["decode"]["sparsity"])]
        quality.add_row(*row)
    console.print(quality)

    if image_text:
        shapes = (
            f"prefill {inputs['prefill_passes']} image+text prompts ({sum(inputs['prefill_prompt_tokens'])} tokens, "
            f"{inputs['prefill_images']} images) one at a time, decode {inputs['decode_passes']} x "
            f"{settings['gen_len']} new tokens one at a time"
        )
    else:
        shapes = (
            f"prefill {settings['prefill_batch_size']}x{settings['prompt_len']} tokens, decode "
            f"{settings['decode_batch_size']} x {settings['gen_len']} new tokens"
        )
    speed = Table(
        title=f"speed on {record['environment']['device']}: median (min-max) of {settings['repeats']} runs; {shapes}"
    )
    _policy_column(speed)
    columns = ["prefill tok/s", *(["prefill samples/s", "prefill images/s"] if image_text else [])]
    columns += ["decode tok/s", "ms/token", "speedup prefill", "speedup decode"]
    for column in columns:
        speed.add_column(column, justify="right")
    for name, policy in policies.items():
        prefill, decode = policy["prefill"], policy["decode"]
        per_token = decode["seconds_per_token"]
        row = [name, _rate(prefill["tokens_per_second"])]
        if image_text:
            row += [_rate(prefill["samples_per_second"], 2), _rate(prefill["images_per_second"], 2)]
        row += [
            _rate(decode["tokens_per_second"]),
            "-" if per_token is None else f"{per_token['median'] * 1000:.2f}",
            _number(prefill["speedup_vs_static"], 3),
            _number(decode["speedup_vs_static"], 3),
        ]
        speed.add_row(*row)
    console.print(speed)

    profiled = policies["static"]["prefill"]["profile"] is not None
    memory = Table(title="peak memory" + (" and time in MoE blocks (--profile-moe runs)" if profiled else ""))
    _policy_column(memory)
    columns = ["peak MiB prefill (+rise)", "peak MiB decode (+rise)"]
    if profiled:
        columns += ["MoE ms prefill", "MoE ms decode", "route/MoE prefill", "route/MoE decode"]
    for column in columns:
        memory.add_column(column, justify="right")
    for name, policy in policies.items():
        prefill, decode = policy["prefill"], policy["decode"]
        row = [name, _memory(prefill), _memory(decode)]
        if profiled:
            row += [
                f"{prefill['profile']['moe_seconds']['median'] * 1000:.2f}",
                f"{decode['profile']['moe_seconds']['median'] * 1000:.2f}",
                _percent(prefill["profile"]["routing_overhead"]),
                _percent(decode["profile"]["routing_overhead"]),
            ]
        memory.add_row(*row)
    console.print(memory)
    console.print(f"peak memory: {record['memory_method']}")
    environment = record["environment"]
    start, end = environment["load_average_start"], environment["load_average_end"]
    if start is not None and end is not None:
        console.print(
            f"1-minute load average {start[0]:.2f} at the start and {end[0]:.2f} at the end, "
            f"on {environment['cpu_count']} logical CPUs"
        )
    for line in target_lines(record["targets"]):
        console.print(line)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def target_lines(targets: dict) -> list[str]:
    """Return one line per performance target: measured, required, met or not."""

    def verdict(met: bool | None) -> str:
        if met is None:
            return "not measured"
        return "met" if met else "not met"

    speedup = targets["decode_speedup"]
    lines = [
        f"target decode speedup >= {speedup['required_min']}: {_number(speedup['measured'], 3)} "
        f"({verdict(speedup['met'])})"
    ]
    if targets["moe_time_reduction"] is None:
        lines.append("targets on MoE-layer time and routing overhead: not measured (pass --profile-moe)")
        return lines
    for phase, target in targets["moe_time_reduction"].items():
        lines.append(
            f"target {phase} MoE-time reduction >= {MOE_TIME_FACTOR} x sparsity {_number(target['sparsity'])} "
            f"= {_number(target['required_min'])}: {_number(target['measured'])} ({verdict(target['met'])})"
        )
    for phase, target in targets["routing_overhead"].items():
        measured = target["measured"]
        measured_text = "-" if measured is None else f"{measured * 100:.2f}%"
        lines.append(
            f"target {phase} routing overhead <= {target['required_max'] * 100:g}% of MoE time: {measured_text} "
            f"({verdict(target['met'])})"
        )
    return lines


# --- plot --------------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise `InvalidInputError` with the install command when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise InvalidInputError(f"--plot needs matplotlib, which is not installed; {PLOT_EXTRA_HINT}.") from error


def write_plot(record: dict, path: Path) -> None:
    """Write the plot of `plot_png` to `path` atomically."""
    write_files_atomically([OutputFile(Path(path), plot_png(record), "plot")])


def plot_png(record: dict) -> bytes:
    """Draw retention against sparsity per policy and gemoe's per-layer k histogram; return the PNG file."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, histogram) = plt.subplots(1, 2, figsize=(13, 5))
    try:
        _draw_curves(curves, record)
        _draw_k_histogram(histogram, record)
        figure.tight_layout()
        png = io.BytesIO()
        figure.savefig(png, dpi=120, format="png")
    finally:
        plt.close(figure)
    return png.getvalue()


_POLICY_COLORS = {
    "static": "tab:gray",
    "gemoe": "tab:blue",
    "top_p": "tab:orange",
    "ratio_skip": "tab:green",
    "static_k": "tab:red",
    "static_k_minus_1": "tab:red",
}
_SWEEP_LABELS = {
    "gemoe": "gemoe (global threshold shift)",
    "top_p": "top_p (p)",
    "ratio_skip": "ratio_skip (beta)",
    "static_k": "static k",
}


def _draw_curves(axes, record: dict) -> None:
    metric = record["settings"]["metric"]
    for name, points in (record["sweep"] or {}).items():
        ordered = sorted(points, key=lambda point: point["sparsity"])
        axes.plot(
            [point["sparsity"] for point in ordered],
            [point["retention"] for point in ordered],
            marker="o",
            markersize=3,
            color=_POLICY_COLORS.get(name),
            label=_SWEEP_LABELS.get(name, name),
        )
    for name, policy in record["policies"].items():
        if policy["evaluation"] is None:
            continue
        point = (policy["evaluation"]["sparsity"]["overall"], policy["retention"])
        axes.scatter(*point, marker="x", s=60, color=_POLICY_COLORS.get(name, "black"), zorder=3)
        axes.annotate(name, point, textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("expert-activation sparsity (evaluation set)")
    axes.set_ylabel(f"retention ({metric})")
    axes.set_title("retention vs sparsity (x: benchmarked policies)")
    axes.grid(True, alpha=0.3)
    if record["sweep"]:
        axes.legend(fontsize=8)


def _draw_k_histogram(axes, record: dict) -> None:
    layers = record["policies"]["gemoe"]["evaluation"]["sparsity"]["layers"]
    names = list(layers)
    max_k = max(len(layer["k_histogram"]) for layer in layers.values())
    bottoms = [0.0] * len(names)
    for k in range(max_k):
        fractions = []
        for name in names:
            histogram = layers[name]["k_histogram"]
            tokens = layers[name]["tokens"]
            count = histogram[k] if k < len(histogram) else 0
            fractions.append(count / tokens if tokens else 0.0)
        if any(fractions):
            axes.bar(range(len(names)), fractions, bottom=bottoms, label=f"k={k}")
            bottoms = [bottom + fraction for bottom, fraction in zip(bottoms, fractions, strict=True)]
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels([str(index) for index in range(len(names))])
    axes.set_xlabel("MoE layer (in model order)")
    axes.set_ylabel("share of tokens")
    axes.set_title("gemoe: experts per token, by layer (evaluation set)")
    axes.legend(fontsize=8)
