"""Validate an exported model: onnxruntime against PyTorch with the same adaptive routing.

Each `ValidationCase` runs one step (prefill, single token, or decode on a non-empty past) through
``model.onnx`` in onnxruntime and through the PyTorch model with `attach_adaptive_routing`. A decode
case first builds its past with a PyTorch prefill, and both sides get that same past. Every output is
compared by its max absolute difference: logits, each present key and value, and
``expert_activations`` against the routing counters. All failures are collected into one error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemoe_cli.errors import RuntimeFailureError
from gemoe_cli.export import decoder

DEFAULT_ATOL = 1e-4
"""Default tolerance on every float32 output's max absolute difference."""


@dataclass(frozen=True)
class ValidationCase:
    """One step to compare: `batch` rows of `sequence` new tokens after `past` cached tokens."""

    name: str
    batch: int
    sequence: int
    past: int

    def describe(self) -> str:
        return f"{self.name} (batch {self.batch}, {self.sequence} new, past {self.past})"


DEFAULT_CASES: tuple[ValidationCase, ...] = (
    ValidationCase("prefill", 1, 7, 0),
    ValidationCase("batched prefill", 3, 5, 0),
    ValidationCase("single token, empty past", 2, 1, 0),
    ValidationCase("decode", 1, 1, 7),
    ValidationCase("batched decode", 3, 1, 5),
    ValidationCase("chunk after past", 2, 3, 4),
)


@dataclass
class OutputCheck:
    """The largest difference of one output over all cases, and the case where it occurred."""

    name: str
    max_abs_diff: float = 0.0
    case: str | None = None
    passed: bool = True


@dataclass
class ValidationReport:
    """Per-output differences and the errors of cases that did not run."""

    atol: float
    cases: list[str]
    checks: dict[str, OutputCheck] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def record(self, name: str, difference: float, case: str) -> None:
        check = self.checks.setdefault(name, OutputCheck(name))
        if difference > check.max_abs_diff or check.case is None:
            check.max_abs_diff = difference
            check.case = case
        if not difference <= self.atol:
            check.passed = False

    @property
    def failures(self) -> list[str]:
        over = [
            f"{check.name}: max abs diff {check.max_abs_diff:.3e} in {check.case}"
            for check in self.checks.values()
            if not check.passed
        ]
        return over + self.errors

    @property
    def passed(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        """Return one line per output: a check mark or cross, the name, and its max abs difference."""
        lines = []
        for check in self.checks.values():
            mark = "✓" if check.passed else "✗"
            lines.append(f"{mark} {check.name}: max abs diff {check.max_abs_diff:.3e} (atol {self.atol:.0e})")
        lines.extend(f"✗ {error}" for error in self.errors)
        return lines

    def as_json(self) -> dict:
        return {
            "atol": self.atol,
            "passed": self.passed,
            "cases": self.cases,
            "max_abs_diff": {name: check.max_abs_diff for name, check in self.checks.items()},
            "errors": self.errors,
        }

    def raise_for_failures(self) -> None:
        """Raise `RuntimeFailureError` (exit code 3) that lists every failure, if any."""
        failures = self.failures
        if failures:
            raise RuntimeFailureError(
                f"ONNX validation failed against PyTorch at --atol {self.atol:g} ({len(failures)} problems): "
                + "; ".join(failures)
                + ". Check the listed outputs, or pass a larger --atol if the differences are expected."
            )


def _difference(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if actual.size == 0:
        return 0.0
    actual = actual.astype(np.float64)
    expected = expected.astype(np.float64)
    nan_mismatch = np.isnan(actual) != np.isnan(expected)
    if nan_mismatch.any():
        return float("inf")
    both_finite = np.isfinite(actual) & np.isfinite(expected)
    if (~both_finite & (actual != expected) & ~np.isnan(actual)).any():
        return float("inf")
    return float(np.abs(actual[both_finite] - expected[both_finite]).max(initial=0.0))


def create_session(path: Path, threads: int | None = None):
    """Open an onnxruntime CPU session on `path`, raising `RuntimeFailureError` when it cannot load."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own pybind exception types
        raise RuntimeFailureError(f"onnxruntime failed to load {path}: {str(error).splitlines()[0]}") from error


def session_feeds(session, input_ids, attention_mask, position_ids, past) -> dict[str, np.ndarray]:
    """Map one step's tensors to the inputs that `session` declares (the exporter drops unused ones)."""
    values = {
        decoder.INPUT_IDS: input_ids,
        decoder.ATTENTION_MASK: attention_mask,
        decoder.POSITION_IDS: position_ids,
    }
    for layer, (key, value) in enumerate(past):
        key_name, value_name = decoder.past_names(layer)
        values[key_name] = key
        values[value_name] = value
    declared = [item.name for item in session.get_inputs()]
    return {name: _to_numpy(values[name]) for name in declared}


def _to_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def validate_export(
    path: Path,
    model: torch.nn.Module,
    routing,
    *,
    atol: float = DEFAULT_ATOL,
    cases: tuple[ValidationCase, ...] = DEFAULT_CASES,
    seed: int = 0,
) -> ValidationReport:
    """Compare ``model.onnx`` at `path` with `model` under `routing` (a `RoutingSpec`) on `cases`.

    `model` is left as it was: the adaptive routing attached here is removed before returning.
    """
    from gemoe_cli.routing import attach_adaptive_routing

    session = create_session(path)
    output_names = [item.name for item in session.get_outputs()]
    layout = decoder.cache_layout(model)
    vocab = model.config.get_text_config().vocab_size
    report = ValidationReport(atol=atol, cases=[case.describe() for case in cases])
    generator = torch.Generator().manual_seed(seed)

    with attach_adaptive_routing(
        model, routing.thresholds, k_min=routing.k_min, k_max=routing.k_max, renormalize=routing.renormalize
    ) as adaptive:
        reference = decoder.DecoderWithCache(model)
        paths = list(adaptive.layers)
        for case in cases:
            ids = torch.randint(0, vocab, (case.batch, case.past + case.sequence), generator=generator)
            with torch.no_grad():
                past = layout.empty_past(case.batch)
                if case.past:
                    _, past = reference(*decoder.step_inputs(ids[:, : case.past], past))
                step = decoder.step_inputs(ids[:, case.past :], past)
                adaptive.reset_counters()
                logits, present = reference(*step)
                counters = adaptive.counters()
            expected = {decoder.LOGITS: logits}
            for layer, (key, value) in enumerate(present):
                key_name, value_name = decoder.present_names(layer)
                expected[key_name], expected[value_name] = key, value
            expected[decoder.EXPERT_ACTIVATIONS] = torch.tensor([counters[p].active_pairs for p in paths])

            try:
                actual = session.run(None, session_feeds(session, *step))
            except Exception as error:  # onnxruntime raises its own pybind exception types
                report.errors.append(f"{case.describe()}: onnxruntime failed: {str(error).splitlines()[0]}")
                continue
            for name, value in zip(output_names, actual, strict=True):
                if name not in expected:
                    report.errors.append(f"{case.describe()}: unexpected output {name}")
                    continue
                report.record(name, _difference(value, _to_numpy(expected[name])), case.describe())
    return report
