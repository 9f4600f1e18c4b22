"""Benchmark a loaded model: every policy on the same inputs, in one process, in interleaved rounds.

Phases, in order:

1. Evaluate `static` and `gemoe` on the evaluation set (retention and sparsity), calibrate the baselines
   to GeMoE's measured sparsity, and evaluate them too.
2. Warm up every policy, then time `repeats` rounds. Each round attaches each policy in turn and runs one
   prefill run and one decode run, so slow drift of the machine spreads over all policies.
3. Measure peak memory of one prefill and one generation per policy, in runs of their own.
4. With `profile_moe`, time MoE blocks and `route` in synchronised runs of their own.
5. With `sweep_points`, evaluate each policy over a range of its parameter for the plot.

`run_benchmark` returns the JSON record that `gemoe_cli.bench.report` documents and renders.

A prefill run is one forward pass over (B, L) token ids for token-block data. For image+text data it is one
forward pass per sample, each a batch of one, as calibration runs them, so no padding token reaches a
router. Decode runs are built the same way, with one `generate` call per pass.

Legend for shape comments: B sequences, L prompt tokens, N tokens in the stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from gemoe_cli.api import model_identity
from gemoe_cli.bench.accounting import ActivationTally
from gemoe_cli.bench.policies import (
    GEMOE,
    NATIVE,
    RATIO_SKIP,
    STATIC,
    TOP_P,
    Policy,
    RoutingSpec,
    calibrate_baselines,
    gemoe_policy,
    native_policy,
    set_baseline,
    shifted_modality_thresholds,
    shifted_thresholds,
    static_policy,
    sweep_parameters,
)
from gemoe_cli.bench.report import build_record, load_average
from gemoe_cli.bench.settings import BenchSettings
from gemoe_cli.bench.timing import (
    MemoryUsage,
    MoEProfiler,
    measure_peak_memory,
    memory_method,
    model_device,
    prompt_arguments,
    time_decode,
    time_prefill,
)
from gemoe_cli.calibration.multimodal import MultimodalBatch
from gemoe_cli.calibration.retention import evaluate, floating_inputs_as, forward_module
from gemoe_cli.errors import InvalidInputError
from gemoe_cli.routing import AdaptiveRouting
from gemoe_cli.routing.baselines import RatioSkip, StaticK, TopP

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchInputs:
    """The inputs every policy runs on.

    A timed prefill run takes the prompts of `prefill` one after another, and a decode run those of `decode`.
    Token-block data has one (B, L) tensor in each list. Image+text data has one `MultimodalBatch` per
    sample, cut before its answer.
    """

    eval_batches: list
    """Evaluation data for retention and sparsity: (B_eval, L_eval) token blocks or `MultimodalBatch` samples."""
    prefill: list
    decode: list
    prompts_repeated: bool = False
    """True when the data was shorter than the prompts and had to be repeated."""

    @property
    def image_text(self) -> bool:
        return not isinstance(self.prefill[0], torch.Tensor)

    @property
    def prefill_ids(self) -> torch.Tensor:
        """The (B, L) prefill prompt of token-block data."""
        return self._only_tensor(self.prefill)

    @property
    def decode_ids(self) -> torch.Tensor:
        """The (B_decode, L) decode prompt of token-block data."""
        return self._only_tensor(self.decode)

    def _only_tensor(self, prompts: list) -> torch.Tensor:
        if self.image_text:
            raise ValueError("image+text inputs have one prompt per sample, not one token tensor")
        return prompts[0]

    def to(self, device) -> BenchInputs:
        return BenchInputs(
            [batch.to(device) for batch in self.eval_batches],
            [prompt.to(device) for prompt in self.prefill],
            [prompt.to(device) for prompt in self.decode],
            self.prompts_repeated,
        )

    def to_json(self) -> dict:
        image_text = self.image_text
        return {
            "kind": "image+text" if image_text else "text",
            "eval_blocks": sum(batch.size(0) for batch in self.eval_batches),
            "eval_tokens": sum(batch.numel() for batch in self.eval_batches),
            "eval_seq_len": self.eval_batches[0].size(1) if self.eval_batches and not image_text else None,
            "prefill_shape": None if image_text else list(self.prefill_ids.shape),
            "decode_prompt_shape": None if image_text else list(self.decode_ids.shape),
            "prefill_passes": len(self.prefill),
            "decode_passes": len(self.decode),
            "prefill_prompt_tokens": _prompt_lengths(self.prefill),
            "decode_prompt_tokens": _prompt_lengths(self.decode),
            "prefill_images": sum(getattr(prompt, "images", 0) for prompt in self.prefill),
            "decode_images": sum(getattr(prompt, "images", 0) for prompt in self.decode),
            "prompts_repeated": self.prompts_repeated,
        }


def _prompt_lengths(prompts: list) -> list[int]:
    """Return the tokens of each sequence of `prompts`, in order."""
    return [prompt.size(1) for prompt in prompts for _ in range(prompt.size(0))]


def build_inputs(stream: torch.Tensor, eval_batches: list[torch.Tensor], settings: BenchSettings) -> BenchInputs:
    """Cut the prefill and decode prompts from the start of a token stream (N,), repeating it if too short."""
    length = settings.prompt_len
    needed = max(settings.prefill_batch_size, settings.decode_batch_size) * length
    repeated = stream.numel() < needed
    if repeated:
        logger.warning("only %d tokens for %d prompt tokens; the prompts repeat the text", stream.numel(), needed)
        stream = stream.repeat(math.ceil(needed / max(stream.numel(), 1)))
    prefill = stream[: settings.prefill_batch_size * length].reshape(settings.prefill_batch_size, length)
    decode = stream[: settings.decode_batch_size * length].reshape(settings.decode_batch_size, length)
    return BenchInputs(list(eval_batches), [prefill.clone()], [decode.clone()], repeated)


def build_image_text_inputs(
    prompt_samples: Sequence[MultimodalBatch], eval_samples: Sequence[MultimodalBatch], settings: BenchSettings
) -> BenchInputs:
    """Take the prefill and decode prompts from the first of `prompt_samples`, each cut before its answer.

    The prefill run gets `settings.prefill_batch_size` samples and the decode run `settings.decode_batch_size`,
    repeated from the start when there are fewer samples.
    """
    needed = max(settings.prefill_batch_size, settings.decode_batch_size)
    prompts = [sample.prompt() for sample in prompt_samples]
    if not prompts:
        raise ValueError("no image+text samples for the prompts")
    repeated = len(prompts) < needed
    if repeated:
        logger.warning("only %d image+text samples for %d prompts; the prompts repeat them", len(prompts), needed)
        prompts = prompts * math.ceil(needed / len(prompts))
    return BenchInputs(
        list(eval_samples), prompts[: settings.prefill_batch_size], prompts[: settings.decode_batch_size], repeated
    )


@dataclass
class PolicyRun:
    """Everything measured for one policy."""

    policy: Policy
    evaluation: dict | None = None
    prefill_seconds: list[float] = field(default_factory=list)
    first_token_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    decode_steps: int = 0
    prefill_tally: ActivationTally | None = None
    decode_tally: ActivationTally | None = None
    memory: dict[str, MemoryUsage] = field(default_factory=dict)
    profile: dict[str, dict[str, list[float]]] | None = None
    extra: dict = field(default_factory=dict)


@contextmanager
def attached(policy: Policy, model: torch.nn.Module) -> Iterator[AdaptiveRouting | None]:
    """Attach `policy` to `model` for the block, then remove it (`None` for the native policy)."""
    routing = policy.attach(model)
    try:
        yield routing
    finally:
        if routing is not None:
            routing.remove()


def evaluate_policy(model: torch.nn.Module, routing: AdaptiveRouting, batches: Sequence, metric: str) -> dict:
    """Run `evaluate` (static, then as routed now) and return its record with per-layer sparsity.

    The image+text figures (``exact_match``, ``modality_sparsity``) are null for token-block data.
    """
    evaluation = evaluate(model, routing, batches)
    tally = ActivationTally(routing)
    tally.add(routing.counters())
    record = {"exact_match": None, "modality_sparsity": None, **evaluation.to_json()}
    record["retention"].setdefault("exact_match", None)
    record["sparsity"] = tally.to_json()
    record["metric"] = metric
    return record


@torch.no_grad()
def _native_logit_difference(model, spec: RoutingSpec, prompt) -> float:
    """Return the largest |logit| difference between no gemoe and gemoe's static path on one prompt."""
    module = forward_module(model)
    arguments = floating_inputs_as(prompt_arguments(prompt), module)
    native = module(**arguments, use_cache=False).logits.float()
    with attached(static_policy(spec), model):
        static = module(**arguments, use_cache=False).logits.float()
    return float((native - static).abs().max())


def run_benchmark(
    model: torch.nn.Module,
    spec: RoutingSpec,
    inputs: BenchInputs,
    settings: BenchSettings,
    progress: Progress | None = None,
) -> dict:
    """Measure every policy on `model` (in place; everything attached is removed again) and return the record.

    `model` must be in eval mode and must not have gemoe routing attached. It runs on the device of its first
    parameter, and `inputs` are moved there.
    """
    say = progress or (lambda message: None)
    if settings.metric == "exact_match" and not inputs.image_text:
        raise InvalidInputError("--metric exact_match needs image+text data with answers; use nll, agreement or kl.")
    load_average_start = load_average()
    device = model_device(model)
    inputs = inputs.to(device)
    identity = model_identity(model)
    sweep = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        runs = _evaluate_policies(model, spec, inputs, settings, say)
        _time_policies(model, runs, inputs, settings, say)
        _measure_memory(model, runs, inputs, settings, say)
        if settings.profile_moe:
            _profile_policies(model, runs, inputs, settings, say)
        if settings.sweep_points:
            sweep = _sweep(model, spec, inputs, settings, say)
    return build_record(
        identity=identity.model_dump(),
        spec=spec,
        inputs=inputs.to_json(),
        settings=settings,
        runs=list(runs.values()),
        sweep=sweep,
        device=device,
        memory_method=memory_method(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        load_average_start=load_average_start,
    )


def _evaluate_policies(model, spec, inputs, settings, say) -> dict[str, PolicyRun]:
    eval_tokens = sum(batch.numel() for batch in inputs.eval_batches)
    runs = {policy.name: PolicyRun(policy) for policy in (native_policy(), static_policy(spec), gemoe_policy(spec))}
    for name in (STATIC, GEMOE):
        say(f"evaluating {name} on {eval_tokens} tokens")
        with attached(runs[name].policy, model) as routing:
            runs[name].evaluation = evaluate_policy(model, routing, inputs.eval_batches, settings.metric)
    runs[NATIVE].extra["max_abs_logit_difference_vs_static"] = _native_logit_difference(model, spec, inputs.decode[0])

    target = runs[GEMOE].evaluation["sparsity"]["overall"]
    for policy in calibrate_baselines(model, spec, inputs.eval_batches, target, progress=say):
        say(f"evaluating {policy.name} on {eval_tokens} tokens")
        runs[policy.name] = PolicyRun(policy)
        with attached(policy, model) as routing:
            runs[policy.name].evaluation = evaluate_policy(model, routing, inputs.eval_batches, settings.metric)
    return runs


def _prefill_run(model, inputs: BenchInputs) -> float:
    """Run every prefill prompt in turn and return the seconds of their forward passes, summed."""
    return sum(time_prefill(model, prompt) for prompt in inputs.prefill)


def _decode_run(model, inputs: BenchInputs, settings: BenchSettings) -> None:
    for prompt in inputs.decode:
        time_decode(model, prompt, settings.gen_len)


def _run_prefill_and_decode(model, run: PolicyRun, inputs: BenchInputs, settings: BenchSettings, record: bool):
    with attached(run.policy, model) as routing:
        if routing is not None:
            routing.reset_counters()
        seconds = _prefill_run(model, inputs)
        if record:
            run.prefill_seconds.append(seconds)
            if routing is not None:
                run.prefill_tally = run.prefill_tally or ActivationTally(routing)
                run.prefill_tally.add(routing.counters())

        first_token_seconds = decode_seconds = 0.0
        prompt_counts: dict = {}
        on_first_step = (lambda: prompt_counts.update(routing.counters())) if routing is not None else None
        for prompt in inputs.decode:
            prompt_counts.clear()
            if routing is not None:
                routing.reset_counters()
            timing = time_decode(model, prompt, settings.gen_len, on_first_step)
            first_token_seconds += timing.first_token_seconds
            decode_seconds += timing.decode_seconds
            if record:
                run.decode_steps = timing.decode_steps
                if routing is not None:
                    # Counters taken at the first new token hold the prompt's prefill, so only later steps count.
                    run.decode_tally = run.decode_tally or ActivationTally(routing)
                    run.decode_tally.add(routing.counters(), minus=prompt_counts)
        if record:
            run.first_token_seconds.append(first_token_seconds)
            run.decode_seconds.append(decode_seconds)


def _time_policies(model, runs: dict[str, PolicyRun], inputs, settings, say) -> None:
    say(f"warming up {len(runs)} policies ({settings.warmup} run each)")
    for run in runs.values():
        for _ in range(settings.warmup):
            _run_prefill_and_decode(model, run, inputs, settings, record=False)
    for round_number in range(1, settings.repeats + 1):
        say(f"timing round {round_number} of {settings.repeats}")
        for run in runs.values():
            _run_prefill_and_decode(model, run, inputs, settings, record=True)


def _measure_memory(model, runs: dict[str, PolicyRun], inputs, settings, say) -> None:
    device = model_device(model)
    say("measuring peak memory")
    for run in runs.values():
        with attached(run.policy, model):
            run.memory["prefill"] = measure_peak_memory(device, lambda: _prefill_run(model, inputs))
            run.memory["decode"] = measure_peak_memory(device, lambda: _decode_run(model, inputs, settings))


def _profile_policies(model, runs: dict[str, PolicyRun], inputs, settings, say) -> None:
    for run in runs.values():
        run.profile = {phase: {"moe": [], "route": [], "wall": []} for phase in ("prefill", "decode")}
    for round_number in range(1, settings.repeats + 1):
        say(f"profiling MoE blocks, round {round_number} of {settings.repeats}")
        for run in runs.values():
            _profile_once(model, run, inputs, settings)


def _profile_once(model, run: PolicyRun, inputs: BenchInputs, settings: BenchSettings) -> None:
    with attached(run.policy, model) as routing, MoEProfiler(model, routing) as profiler:
        moe_before, route_before = profiler.snapshot()
        wall = _prefill_run(model, inputs)
        moe_after, route_after = profiler.snapshot()
        _append_profile(run.profile["prefill"], profiler, moe_after - moe_before, route_after - route_before, wall)

        moe = route = wall = 0.0
        at_first_step: list[tuple[float, float]] = []
        for prompt in inputs.decode:
            at_first_step.clear()
            timing = time_decode(model, prompt, settings.gen_len, lambda: at_first_step.append(profiler.snapshot()))
            moe_before, route_before = at_first_step[0]
            moe_after, route_after = profiler.snapshot()
            moe += moe_after - moe_before
            route += route_after - route_before
            wall += timing.decode_seconds
        _append_profile(run.profile["decode"], profiler, moe, route, wall)


def _append_profile(phase: dict, profiler: MoEProfiler, moe: float, route: float, wall: float) -> None:
    phase["moe"].append(moe)
    if profiler.routing is not None:
        # The native policy has no route step, so its route list stays empty and reports None.
        phase["route"].append(route)
    phase["wall"].append(wall)


def _sweep(model, spec: RoutingSpec, inputs, settings, say) -> dict[str, list[dict]]:
    """Return retention and sparsity on the evaluation set over each policy's sweep parameters."""
    with spec.attach(model) as routing:
        num_experts = max(layer.moe.num_experts for layer in routing.layers.values())
        top_k = min(layer.moe.top_k for layer in routing.layers.values())
    parameters = sweep_parameters(settings.sweep_points, num_experts, top_k, spec.k_min)
    sweeps: dict[str, list[dict]] = {}
    for name, values in parameters.items():
        say(f"sweeping {name} over {len(values)} points")
        points = []
        with spec.attach(model) as routing:
            for value in values:
                if name == GEMOE:
                    routing.set_thresholds(shifted_thresholds(spec.thresholds, value))
                    routing.set_modality_thresholds(shifted_modality_thresholds(spec.modality_thresholds, value))
                else:
                    baseline = {TOP_P: TopP, RATIO_SKIP: RatioSkip, "static_k": lambda k: StaticK(int(k))}[name]
                    set_baseline(routing, spec, baseline(value))
                evaluation = evaluate(model, routing, inputs.eval_batches)
                points.append(
                    {
                        "parameter": value,
                        "sparsity": evaluation.sparsity,
                        "retention": evaluation.retention(settings.metric),
                    }
                )
        sweeps[name] = points
    return sweeps
