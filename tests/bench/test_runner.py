"""Tests of `run_benchmark` on an in-memory tiny OLMoE, each figure checked against an independent count."""

import pytest
import torch

from gemoe_cli.bench import BenchSettings, RoutingSpec, build_inputs, run_benchmark
from gemoe_cli.bench.policies import SPARSITY_TOLERANCE
from gemoe_cli.bench.timing import time_decode
from gemoe_cli.calibration.retention import evaluate
from gemoe_cli.routing import find_moe_blocks
from gemoe_cli.routing.baselines import RatioSkip, StaticK, TopP
from tests.bench.conftest import entropy_thresholds
from tests.tiny_models import build, forward_logits, input_ids

SETTINGS = BenchSettings(
    prefill_batch_size=2, prompt_len=16, decode_batch_size=2, gen_len=4, eval_batch_size=4, profile_moe=True
)
ADAPTIVE_POLICIES = ("static", "gemoe", "top_p", "ratio_skip", "static_k_minus_1")


@pytest.fixture(scope="module")
def model():
    return build("olmoe")


@pytest.fixture(scope="module")
def spec(model) -> RoutingSpec:
    return RoutingSpec(entropy_thresholds(model, input_ids(4, 32, seed=7)), source="test thresholds")


@pytest.fixture(scope="module")
def inputs():
    eval_batches = [input_ids(4, 32, seed=1), input_ids(4, 32, seed=2)]
    return build_inputs(input_ids(1, 64, seed=3).reshape(-1), eval_batches, SETTINGS)


@pytest.fixture(scope="module")
def benchmark(model, spec, inputs):
    """(record, logits on a probe input before the benchmark)."""
    probe = input_ids(2, 9, seed=5)
    before = forward_logits(model, probe)
    record = run_benchmark(model, spec, inputs, SETTINGS)
    return record, before, probe


def attach_policy(model, spec: RoutingSpec, name: str, record: dict):
    """Attach the named policy the way a user would, with the parameter from the record."""
    if name == "static":
        from gemoe_cli.routing import attach_adaptive_routing

        return attach_adaptive_routing(model, {})
    routing = spec.attach(model)
    parameter = record["policies"][name]["parameter"]
    baseline = {"top_p": TopP, "ratio_skip": RatioSkip, "static_k_minus_1": lambda k: StaticK(int(k))}.get(name)
    if baseline is not None:
        for layer in routing.layers.values():
            layer.baseline = baseline(parameter["value"])
    return routing


class PairCounter:
    """Forward pre-hooks on every experts module that count the (token, expert) pairs they receive.

    Registered after gemoe's own pre-hook, so they see the rewritten selection; slots holding the sentinel
    index E are not pairs. `skip_first_call` leaves out the first call per layer (a generation's prompt).
    """

    def __init__(self, model, skip_first_call: bool = False):
        self.blocks = find_moe_blocks(model)
        self.skip_first_call = skip_first_call
        self.active = 0
        self.static = 0
        self.calls = {block.path: 0 for block in self.blocks}
        self.handles = []

    def __enter__(self):
        for block in self.blocks:
            self.handles.append(block.experts.register_forward_pre_hook(self.hook(block), with_kwargs=True))
        return self

    def hook(self, block):
        def count(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self.calls[block.path] += 1
            if self.skip_first_call and self.calls[block.path] == 1:
                return None
            self.active += int(((index >= 0) & (index < block.num_experts)).sum())
            self.static += block.top_k * index.size(0)
            return None

        return count

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.static


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_eval_sparsity_matches_independent_count(benchmark, model, spec, inputs, name):
    record, _, _ = benchmark
    with attach_policy(model, spec, name, record), PairCounter(model) as counter, torch.no_grad():
        for batch in inputs.eval_batches:
            model(input_ids=batch, use_cache=False)
    sparsity = record["policies"][name]["evaluation"]["sparsity"]
    assert sparsity["active_pairs"] == counter.active
    assert sparsity["static_pairs"] == counter.static
    assert sparsity["overall"] == pytest.approx(counter.sparsity, abs=1e-12)


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_prefill_sparsity_matches_independent_count(benchmark, model, spec, inputs, name):
    record, _, _ = benchmark
    with attach_policy(model, spec, name, record), PairCounter(model) as counter, torch.no_grad():
        model(input_ids=inputs.prefill_ids, use_cache=False)
    sparsity = record["policies"][name]["prefill"]["sparsity"]
    assert sparsity["active_pairs"] == SETTINGS.repeats * counter.active
    assert sparsity["overall"] == pytest.approx(counter.sparsity, abs=1e-12)


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_decode_sparsity_matches_independent_count(benchmark, model, spec, inputs, name):
    record, _, _ = benchmark
    with attach_policy(model, spec, name, record), PairCounter(model, skip_first_call=True) as counter:
        time_decode(model, inputs.decode_ids, SETTINGS.gen_len)
    sparsity = record["policies"][name]["decode"]["sparsity"]
    expected_tokens = SETTINGS.decode_batch_size * (SETTINGS.gen_len - 1)
    assert counter.static == 2 * 4 * expected_tokens  # two MoE layers, K = 4
    assert sparsity["active_pairs"] == SETTINGS.repeats * counter.active
    assert sparsity["overall"] == pytest.approx(counter.sparsity, abs=1e-12)


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_retention_matches_independent_evaluate(benchmark, model, spec, inputs, name):
    record, _, _ = benchmark
    with attach_policy(model, spec, name, record) as routing:
        evaluation = evaluate(model, routing, inputs.eval_batches)
    policy = record["policies"][name]
    assert policy["retention"] == pytest.approx(evaluation.retention("nll"), abs=1e-9)
    assert policy["evaluation"]["agreement"] == pytest.approx(evaluation.agreement, abs=1e-12)


@pytest.mark.parametrize("name", ["top_p", "ratio_skip"])
def test_baseline_sparsity_matches_gemoe(benchmark, name):
    record, _, _ = benchmark
    gemoe = record["policies"]["gemoe"]["evaluation"]["sparsity"]["overall"]
    policy = record["policies"][name]
    assert 0.0 < gemoe < 0.75
    assert policy["calibration"]["target_sparsity"] == gemoe
    assert policy["calibration"]["converged"] is True
    assert abs(policy["evaluation"]["sparsity"]["overall"] - gemoe) <= SPARSITY_TOLERANCE


def test_static_k_minus_1_sparsity(benchmark):
    record, _, _ = benchmark
    assert record["policies"]["static_k_minus_1"]["evaluation"]["sparsity"]["overall"] == pytest.approx(0.25)


def test_static_equals_native(benchmark):
    record, _, _ = benchmark
    assert record["policies"]["static"]["retention"] == pytest.approx(1.0, abs=1e-9)
    assert record["policies"]["static"]["evaluation"]["sparsity"]["overall"] == 0.0
    assert record["policies"]["static_native"]["max_abs_logit_difference_vs_static"] < 1e-4


def test_native_has_no_counts(benchmark):
    record, _, _ = benchmark
    native = record["policies"]["static_native"]
    assert native["evaluation"] is None
    assert native["retention"] is None
    for phase in ("prefill", "decode"):
        assert native[phase]["sparsity"] is None
        assert native[phase]["profile"]["route_seconds"] is None
        assert native[phase]["profile"]["routing_overhead"] is None


def test_static_speedup_is_one(benchmark):
    record, _, _ = benchmark
    for phase in ("prefill", "decode"):
        assert record["policies"]["static"][phase]["speedup_vs_static"] == 1.0


def test_every_run_recorded(benchmark):
    record, _, _ = benchmark
    for policy in record["policies"].values():
        for phase in ("prefill", "decode"):
            assert len(policy[phase]["seconds"]["values"]) == SETTINGS.repeats
            assert len(policy[phase]["profile"]["moe_seconds"]["values"]) == SETTINGS.repeats
        assert policy["decode"]["timed_steps"] == SETTINGS.gen_len - 1


def test_model_restored_after_benchmark(benchmark, model):
    _, before, probe = benchmark
    assert torch.equal(forward_logits(model, probe), before)
    for block in find_moe_blocks(model):
        assert not block.experts._forward_pre_hooks
        assert not block.router._forward_hooks
        assert not block.block._forward_pre_hooks
        assert not block.block._forward_hooks
    assert model.get_experts_implementation() != "gemoe_sparse"
