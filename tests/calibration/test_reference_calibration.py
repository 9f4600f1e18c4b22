"""Calibration on the trained reference model: budget accuracy, and allocation against the uniform baseline.

The reference model has learned routers (random routers have near-uniform gating entropy), so these tests
check the claims that matter to users: held-out sparsity lands on the target, and spreading sparsity over
layers by measured cost keeps more quality than the same entropy quantile in every layer.
"""

import json

import pytest
from typer.testing import CliRunner

from gemoe_cli.cli.app import app
from gemoe_cli.reference_model import ensure_reference_model

TARGET = 0.365
runner = CliRunner()


@pytest.fixture(scope="module")
def reference_dir():
    return str(ensure_reference_model())


@pytest.fixture(scope="module")
def reports(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference-calibration")
    results = {}
    for policy in ("allocated", "uniform"):
        report_file = folder / f"{policy}.json"
        result = runner.invoke(
            app,
            [
                "calibrate",
                reference_dir,
                "--target-sparsity",
                str(TARGET),
                "--policy",
                policy,
                "--device",
                "cpu",
                "-o",
                str(folder / f"{policy}.yaml"),
                "--report",
                str(report_file),
            ],
        )
        assert result.exit_code == 0, result.output
        results[policy] = json.loads(report_file.read_text())
    return results


def test_heldout_sparsity_on_target(reports):
    heldout = reports["allocated"]["heldout"]

    assert heldout["sparsity"] == pytest.approx(TARGET, abs=0.01)
    assert heldout["tokens"] > 5000


def test_retention_is_measured_not_predicted(reports):
    heldout = reports["allocated"]["heldout"]

    assert heldout["nll_adaptive"] > heldout["nll_static"]
    assert heldout["retention"]["nll"] == pytest.approx(
        pow(2.718281828459045, heldout["nll_static"] - heldout["nll_adaptive"]), rel=1e-9
    )


def test_allocation_beats_uniform_quantile(reports):
    allocated, uniform = reports["allocated"]["heldout"], reports["uniform"]["heldout"]
    print(
        f"allocated: sparsity {allocated['sparsity']:.4f}, nll retention {allocated['retention']['nll']:.4f}; "
        f"uniform quantile: sparsity {uniform['sparsity']:.4f}, nll retention {uniform['retention']['nll']:.4f}"
    )

    assert allocated["sparsity"] == pytest.approx(uniform["sparsity"], abs=0.01)
    assert allocated["retention"]["nll"] > uniform["retention"]["nll"]
