"""Tests of baseline calibration by bisection and of the sweep parameters."""

import math

import pytest

from gemoe_cli.bench.policies import (
    MAX_BISECTION_STEPS,
    SPARSITY_TOLERANCE,
    bisect_parameter,
    shifted_thresholds,
    sweep_parameters,
)


def test_bisect_rising_function_converges():
    calibration = bisect_parameter(lambda value: value, 0.3, 0.0, 1.0, sparsity_rises=True)
    assert calibration.converged
    assert abs(calibration.parameter - 0.3) <= SPARSITY_TOLERANCE
    assert calibration.history[0] == (0.5, 0.5)
    assert calibration.history[1] == (0.25, 0.25)


def test_bisect_falling_function_converges():
    calibration = bisect_parameter(lambda value: 1.0 - value, 0.3, 0.0, 1.0, sparsity_rises=False)
    assert calibration.converged
    assert abs(calibration.parameter - 0.7) <= SPARSITY_TOLERANCE


def test_bisect_step_function_returns_closest_point():
    # Sparsity jumps from 0.25 to 0.4 at 0.6, so the target 0.3 cannot be reached within tolerance.
    calibration = bisect_parameter(lambda value: 0.25 if value < 0.6 else 0.4, 0.3, 0.0, 1.0, sparsity_rises=True)
    assert not calibration.converged
    assert calibration.steps == MAX_BISECTION_STEPS
    assert calibration.sparsity == 0.25
    assert calibration.parameter < 0.6
    assert calibration.history[-1][0] == pytest.approx(0.6, abs=1e-5)


def test_calibration_json_lists_every_step():
    calibration = bisect_parameter(lambda value: value, 0.3, 0.0, 1.0, sparsity_rises=True)
    record = calibration.to_json()
    assert record["steps"] == len(record["history"]) == calibration.steps
    assert record["history"][0] == {"parameter": 0.5, "sparsity": 0.5}
    assert record["tolerance"] == SPARSITY_TOLERANCE


def test_shifted_thresholds_keep_infinities():
    shifted = shifted_thresholds({"layer": [-math.inf, 1.0, math.inf]}, 0.5)
    assert shifted == {"layer": [-math.inf, 1.5, math.inf]}


def test_sweep_parameters_center_on_recipe():
    parameters = sweep_parameters(points=5, num_experts=16, top_k=4, k_min=1)
    half_range = 0.5 * math.log(16)
    assert parameters["gemoe"] == pytest.approx([-half_range, -half_range / 2, 0.0, half_range / 2, half_range])
    assert parameters["gemoe"][2] == 0.0
    assert parameters["top_p"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert parameters["ratio_skip"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert parameters["static_k"] == [1.0, 2.0, 3.0, 4.0]


def test_sweep_static_k_starts_at_k_min():
    assert sweep_parameters(points=3, num_experts=8, top_k=4, k_min=2)["static_k"] == [2.0, 3.0, 4.0]
