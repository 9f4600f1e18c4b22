"""Tests of the benchmark record: settings validation, targets, gates, JSON and tables."""

import json
import math

import pytest
from rich.console import Console

from gemoe_cli.bench.report import check_gates, evaluate_targets, record_to_json, summarize, target_lines
from gemoe_cli.bench.settings import BenchSettings
from gemoe_cli.errors import InvalidInputError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeats": 4}, "--repeats 4 is too few"),
        ({"gen_len": 1}, "--gen-len 1 is too short"),
        ({"prompt_len": 0}, "--prompt-len 0 is invalid"),
        ({"prefill_batch_size": 0}, "--prefill-batch-size 0 is invalid"),
        ({"warmup": -1}, "--warmup -1 is invalid"),
        ({"metric": "bleu"}, "--metric bleu is unknown"),
        ({"sweep_points": 1}, "--sweep-points 1 is invalid"),
    ],
)
def test_settings_reject_invalid_values(changes, message):
    with pytest.raises(InvalidInputError, match=message):
        BenchSettings(**changes)


def test_settings_defaults():
    settings = BenchSettings()
    assert (settings.prefill_batch_size, settings.prompt_len) == (8, 128)
    assert (settings.decode_batch_size, settings.gen_len, settings.repeats) == (1, 32, 5)
    assert settings.tokens_needed == 160


def test_summarize_stats():
    assert summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}
    assert summarize([]) is None


def phase(tokens_per_second: float, sparsity: float | None, moe: float | None, route: float | None) -> dict:
    profile = None
    if moe is not None:
        profile = {"moe_seconds": {"median": moe}, "routing_overhead": None if route is None else route / moe}
    return {
        "tokens_per_second": {"median": tokens_per_second},
        "speedup_vs_static": None,
        "sparsity": None if sparsity is None else {"overall": sparsity},
        "profile": profile,
    }


def policies(gemoe_moe: float | None = 0.6) -> dict:
    static_moe = None if gemoe_moe is None else 1.0
    route = None if gemoe_moe is None else 0.012
    records = {
        "static": {"prefill": phase(100.0, 0.0, static_moe, route), "decode": phase(10.0, 0.0, static_moe, route)},
        "gemoe": {"prefill": phase(120.0, 0.4, gemoe_moe, route), "decode": phase(13.0, 0.5, gemoe_moe, route)},
    }
    records["gemoe"]["decode"]["speedup_vs_static"] = 1.3
    return records


def test_targets_with_profile():
    targets = evaluate_targets(policies(gemoe_moe=0.6))
    assert targets["decode_speedup"] == {"measured": 1.3, "required_min": 1.2, "met": True}
    prefill = targets["moe_time_reduction"]["prefill"]
    assert prefill["measured"] == pytest.approx(0.4)
    assert prefill["required_min"] == pytest.approx(0.32)
    assert prefill["met"] is True
    decode = targets["moe_time_reduction"]["decode"]
    assert decode["required_min"] == pytest.approx(0.4)
    assert decode["met"] is True
    # 0.012 s of route time in 0.6 s of MoE time is 2%.
    assert targets["routing_overhead"]["decode"]["measured"] == pytest.approx(0.02)
    assert targets["routing_overhead"]["decode"]["met"] is True


def test_targets_not_met():
    targets = evaluate_targets(policies(gemoe_moe=0.9))
    assert targets["moe_time_reduction"]["prefill"]["measured"] == pytest.approx(0.1)
    assert targets["moe_time_reduction"]["prefill"]["met"] is False
    assert targets["routing_overhead"]["prefill"]["measured"] == pytest.approx(0.012 / 0.9)


def test_targets_without_profile_not_measured():
    targets = evaluate_targets(policies(gemoe_moe=None))
    assert targets["moe_time_reduction"] is None
    assert targets["routing_overhead"] is None
    assert "not measured (pass --profile-moe)" in "\n".join(target_lines(targets))


def gate_record(retention: float | None, speedup: float | None) -> dict:
    return {
        "settings": {"metric": "nll"},
        "policies": {"gemoe": {"retention": retention, "decode": {"speedup_vs_static": speedup}}},
        "gates": [],
    }


def test_gates_pass():
    record = gate_record(0.995, 1.3)
    assert check_gates(record, 0.99, 1.2) == []
    assert [gate["passed"] for gate in record["gates"]] == [True, True]


def test_gates_fail_with_measured_and_required():
    record = gate_record(0.98, 1.1)
    failures = check_gates(record, 0.99, 1.2)
    assert failures == [
        "gemoe nll retention 0.9800 is below --fail-under-retention 0.99",
        "gemoe decode speedup over static 1.1000 is below --fail-under-speedup 1.2",
    ]
    assert record["gates"][0] == {
        "option": "--fail-under-retention",
        "measured": 0.98,
        "required_min": 0.99,
        "passed": False,
    }


def test_gate_on_unmeasured_value_fails():
    record = gate_record(None, 1.3)
    assert check_gates(record, 0.99, None) == ["gemoe nll retention not measured is below --fail-under-retention 0.99"]


def test_no_gates_requested():
    record = gate_record(0.5, 0.5)
    assert check_gates(record, None, None) == []
    assert record["gates"] == []


def test_json_writes_non_finite_as_null():
    text = record_to_json({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_target_lines_name_values():
    lines = target_lines(evaluate_targets(policies(gemoe_moe=0.6)))
    assert lines[0] == "target decode speedup >= 1.2: 1.300 (met)"
    assert "target prefill routing overhead <= 3% of MoE time: 2.00% (met)" in lines
    console = Console(record=True, width=200)
    for line in lines:
        console.print(line)
    assert "decode MoE-time reduction" in console.export_text()
