"""Timing harness: synchronised clocks, prefill and decode runs, peak memory and MoE-block profiling.

Every clock read that ends a measurement comes after `synchronize`, so queued GPU work is counted.
Warm-up runs are the caller's business: nothing here records a run it was not asked to time.

A prompt is a (B, L) tensor of token ids, the keyword arguments of one forward pass (``input_ids``,
``attention_mask`` and, for a vision-language model, ``pixel_values`` and the other outputs of its
processor), or a `MultimodalBatch` holding them. Every prompt runs through `forward_module(model)`, which is
Qwen3-Omni's thinker and the model itself for every other family.

Legend for shape comments: B sequences, L prompt tokens.
"""

from __future__ import annotations

import inspect
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from gemoe_cli.calibration.retention import floating_inputs_as, forward_module
from gemoe_cli.routing import AdaptiveRouting, find_moe_blocks

if TYPE_CHECKING:
    from gemoe_cli.calibration.multimodal import MultimodalBatch

MEMORY_SAMPLE_INTERVAL_S = 0.001
"""How often the CPU memory sampler reads the resident set size."""


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished its queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prefill_kwargs(model: torch.nn.Module) -> dict:
    # Serving computes logits only for the last prompt position, so the prefill run does the same where the
    # model allows it. Otherwise the vocabulary projection of every position would dilute the MoE share.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


Prompt = Union[torch.Tensor, Mapping[str, torch.Tensor], "MultimodalBatch"]
"""Token ids (B, L), the keyword arguments of one forward pass, or a `MultimodalBatch`."""


def prompt_arguments(prompt: Prompt) -> dict[str, torch.Tensor]:
    """Return the keyword arguments of a prompt, with an all-ones attention mask where it has none."""
    if isinstance(prompt, torch.Tensor):
        return {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    arguments = dict(prompt) if isinstance(prompt, Mapping) else dict(prompt.inputs)
    arguments.setdefault("attention_mask", torch.ones_like(arguments["input_ids"]))
    return arguments


@torch.no_grad()
def time_prefill(model: torch.nn.Module, prompt: Prompt) -> float:
    """Run one prefill forward pass over `prompt` with a KV cache and return its seconds."""
    device = model_device(model)
    module = forward_module(model)
    kwargs = _prefill_kwargs(module)
    arguments = floating_inputs_as(prompt_arguments(prompt), module)
    synchronize(device)
    started = time.perf_counter()
    module(**arguments, use_cache=True, **kwargs)
    synchronize(device)
    return time.perf_counter() - started


@dataclass(frozen=True)
class DecodeTiming:
    """One greedy generation, split at the first new token.

    `first_token_seconds` covers the prompt's prefill and the first new token. `decode_seconds` covers the
    `decode_steps` forward passes that follow, each of which feeds one token per sequence through the KV cache.
    """

    first_token_seconds: float
    decode_seconds: float
    decode_steps: int


class _StepClock:
    """Logits processor that reads the synchronised clock after every forward pass of `generate`.

    `on_first_step` runs once, after the prompt's forward pass and before the decode clock starts, so
    reading counters there costs the decode measurement nothing.
    """

    def __init__(self, device: torch.device, on_first_step: Callable[[], None] | None):
        self.device = device
        self.on_first_step = on_first_step
        self.first_token_at: float | None = None
        self.decode_started_at: float | None = None
        self.last_step_at: float | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            if self.on_first_step is not None:
                self.on_first_step()
            synchronize(self.device)
            self.decode_started_at = time.perf_counter()
        else:
            self.last_step_at = now
            self.steps += 1
        return scores


def _greedy_generation_config(model: torch.nn.Module, gen_len: int):
    """Copy the model's generation config with sampling off and exactly `gen_len` new tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(model.generation_config.to_dict()) if model.generation_config else None
    config = config or GenerationConfig()
    config.do_sample = False
    config.num_beams = 1
    # Sampling settings would only trigger warnings once sampling is off.
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.min_new_tokens = gen_len
    config.max_new_tokens = gen_len
    config.max_length = None
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


@torch.no_grad()
def time_decode(
    model: torch.nn.Module,
    prompt: Prompt,
    gen_len: int,
    on_first_step: Callable[[], None] | None = None,
) -> DecodeTiming:
    """Generate `gen_len` tokens greedily after `prompt` with a KV cache and time the steps."""
    from transformers import LogitsProcessorList

    device = model_device(model)
    module = forward_module(model)
    clock = _StepClock(device, on_first_step)
    arguments = floating_inputs_as(prompt_arguments(prompt), module)
    synchronize(device)
    started = time.perf_counter()
    module.generate(
        **arguments,
        generation_config=_greedy_generation_config(module, gen_len),
        logits_processor=LogitsProcessorList([clock]),
    )
    if clock.first_token_at is None or clock.last_step_at is None:
        raise RuntimeError(f"generate ran {clock.steps + (clock.first_token_at is not None)} steps, expected {gen_len}")
    return DecodeTiming(
        first_token_seconds=clock.first_token_at - started,
        decode_seconds=clock.last_step_at - clock.decode_started_at,
        decode_steps=clock.steps,
    )


# --- peak memory ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryUsage:
    """Peak memory of one run and how it was measured."""

    method: str
    peak_bytes: int | None
    """The high-water mark during the run (CUDA: allocated by torch, CPU: resident set size)."""
    increase_bytes: int | None
    """`peak_bytes` minus the value just before the run."""


def memory_method(device: torch.device) -> str:
    """Name the way `measure_peak_memory` measures on `device`."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if device.type == "mps":
        return "torch.mps.driver_allocated_memory (after the run; MPS has no peak counter)"
    if _rss_reader() is not None:
        return f"resident set size sampled every {MEMORY_SAMPLE_INTERVAL_S * 1000:g} ms ({_rss_reader_name()})"
    return "resource.getrusage ru_maxrss (process-lifetime high-water mark)"


def _rss_reader_name() -> str:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "/proc/self/statm"
    return "psutil"


def _rss_reader() -> Callable[[], int] | None:
    """Return a function that reads the current resident set size in bytes, or None when there is none."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process()
        return lambda: process.memory_info().rss
    if os.path.exists("/proc/self/statm"):
        page_size = os.sysconf("SC_PAGE_SIZE")

        def read_statm() -> int:
            with open("/proc/self/statm", encoding="ascii") as handle:
                return int(handle.read().split()[1]) * page_size

        return read_statm
    return None


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class _RssSampler:
    """Background thread that keeps the highest resident set size it reads while running."""

    def __init__(self, read: Callable[[], int]):
        self.read = read
        self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gemoe-rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def measure_peak_memory(device: torch.device, run: Callable[[], object]) -> MemoryUsage:
    """Call `run()` once and return its peak memory, measured by the method that `memory_method(device)` names.

    On the CPU the sampled peak can miss an allocation that lives less than one sampling interval, and
    memory that the allocator keeps from earlier runs is part of the starting value, not of the increase.
    """
    method = memory_method(device)
    # NOTE: the CUDA and MPS branches have not run on a GPU yet; the tests cover the CPU branches only.
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryUsage(method, peak, peak - before)
    if device.type == "mps":
        before = torch.mps.driver_allocated_memory()
        run()
        synchronize(device)
        after = torch.mps.driver_allocated_memory()
        return MemoryUsage(method, after, after - before)

    read = _rss_reader()
    if read is None:
        before = _max_rss_bytes()
        run()
        peak = _max_rss_bytes()
        return MemoryUsage(method, peak, peak - before)
    before = read()
    with _RssSampler(read) as sampler:
        run()
    return MemoryUsage(method, sampler.peak, sampler.peak - before)


# --- MoE-block profiling -----------------------------------------------------------------------------


class MoEProfiler:
    """Accumulate the time spent inside MoE blocks and inside the adaptive layers' `route`.

    Forward pre- and post-hooks on every MoE block read the clock after synchronising the device, and each
    adaptive layer's `route` is wrapped the same way. Synchronising inside the forward pass slows it down,
    so profiled runs must be kept apart from the runs that measure throughput. `route` runs inside its MoE
    block, so route time is part of MoE time.
    """

    def __init__(self, model: torch.nn.Module, routing: AdaptiveRouting | None):
        self.model = model
        self.routing = routing
        self.device = model_device(model)
        self.moe_seconds = 0.0
        self.route_seconds = 0.0
        self._undo: list[Callable[[], None]] = []

    def snapshot(self) -> tuple[float, float]:
        """Return (MoE seconds, route seconds) accumulated so far."""
        return self.moe_seconds, self.route_seconds

    def __enter__(self) -> MoEProfiler:
        try:
            for block in find_moe_blocks(self.model):
                self._hook_block(block.block)
            if self.routing is not None:
                for layer in self.routing.layers.values():
                    self._wrap_route(layer)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        while self._undo:
            self._undo.pop()()

    def _hook_block(self, block: torch.nn.Module) -> None:
        starts: list[float] = []

        def before(module, args):
            synchronize(self.device)
            starts.append(time.perf_counter())

        def after(module, args, output):
            synchronize(self.device)
            self.moe_seconds += time.perf_counter() - starts.pop()

        self._undo.append(block.register_forward_pre_hook(before).remove)
        self._undo.append(block.register_forward_hook(after).remove)

    def _wrap_route(self, layer) -> None:
        original = layer.route

        def timed_route(*args, **kwargs):
            synchronize(self.device)
            started = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize(self.device)
            self.route_seconds += time.perf_counter() - started
            return result

        # An instance attribute shadows the method, and deleting it restores the method.
        layer.route = timed_route
        self._undo.append(lambda: layer.__dict__.pop("route", None))
