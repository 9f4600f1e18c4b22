"""Benchmarks of adaptive routing against static top-k and baseline policies, in one process.

    from gemoe_cli.bench import BenchSettings, RoutingSpec, build_inputs, run_benchmark

    record = run_benchmark(model, RoutingSpec.from_recipe(recipe, "recipe.yaml"), inputs, BenchSettings())

Modules: `settings` (what to measure), `timing` (clocks, memory, MoE profiling), `accounting` (sparsity
from the adaptive layers' counters), `policies` (the policies and baseline calibration), `runner`
(`run_benchmark` on a loaded model), `pipeline` (`run_bench` from a model source, for the CLI) and
`report` (the JSON record, tables, gates and plot).

Importing this package loads neither torch nor transformers; the names other than `BenchSettings` load
their module on first use.
"""

from __future__ import annotations

import importlib

from gemoe_cli.bench.settings import BenchSettings

_LAZY_NAMES = {
    "BenchInputs": "gemoe_cli.bench.runner",
    "build_inputs": "gemoe_cli.bench.runner",
    "build_image_text_inputs": "gemoe_cli.bench.runner",
    "run_benchmark": "gemoe_cli.bench.runner",
    "RoutingSpec": "gemoe_cli.bench.policies",
    "run_bench": "gemoe_cli.bench.pipeline",
}

__all__ = ["BenchSettings", *_LAZY_NAMES]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
