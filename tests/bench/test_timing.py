"""Tests of the timing harness: decode step accounting, MoE profiling hooks and peak memory."""

import time

import torch

from gemoe_cli.bench.timing import MoEProfiler, measure_peak_memory, memory_method, time_decode, time_prefill
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from tests.tiny_models import build, input_ids


def test_decode_times_steps_after_first_token():
    model = build("olmoe")
    calls = []
    timing = time_decode(model, input_ids(1, 8), gen_len=5, on_first_step=lambda: calls.append(1))
    assert timing.decode_steps == 4
    assert calls == [1]
    assert timing.decode_seconds > 0
    assert timing.first_token_seconds > 0


def test_decode_overrides_model_generation_config():
    model = build("olmoe")
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.max_new_tokens = 100
    timing = time_decode(model, input_ids(1, 8), gen_len=3)
    assert timing.decode_steps == 2


def test_profiler_counts_moe_and_route_then_restores():
    model = build("olmoe")
    with attach_adaptive_routing(model, {}) as routing:
        with MoEProfiler(model, routing) as profiler:
            time_prefill(model, input_ids(2, 8))
            moe, route = profiler.snapshot()
            assert moe > route > 0
        for layer in routing.layers.values():
            assert "route" not in layer.__dict__
    for block in find_moe_blocks(model):
        assert not block.block._forward_pre_hooks
        assert not block.block._forward_hooks


def test_profiler_without_routing_counts_moe_only():
    model = build("olmoe")
    with MoEProfiler(model, None) as profiler:
        time_prefill(model, input_ids(2, 8))
    moe, route = profiler.snapshot()
    assert moe > 0
    assert route == 0.0


def test_cpu_peak_memory_sees_allocation():
    device = torch.device("cpu")

    def allocate():
        block = torch.ones(16 * 2**20)  # 64 MiB, above glibc's mmap threshold, so fresh resident pages
        time.sleep(0.02)
        return block.sum()

    usage = measure_peak_memory(device, allocate)
    assert usage.method == memory_method(device)
    assert usage.increase_bytes >= 60 * 2**20
    assert usage.peak_bytes >= usage.increase_bytes
