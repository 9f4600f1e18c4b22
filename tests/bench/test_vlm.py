"""`run_benchmark` on a tiny qwen3_vl_moe with image+text samples, each figure checked against an independent
count: prompt tokens and images, per-modality expert activations, retention and exact-match agreement."""

import math

import pytest
import torch

from gemoe_cli.bench import BenchSettings, RoutingSpec, run_benchmark
from gemoe_cli.bench.runner import build_image_text_inputs
from gemoe_cli.bench.timing import prompt_arguments, time_decode, time_prefill
from gemoe_cli.calibration.images import BUILTIN_IMAGES, read_image_text_samples
from gemoe_cli.calibration.multimodal import encode_sample
from gemoe_cli.calibration.retention import evaluate
from gemoe_cli.routing import attach_adaptive_routing, find_moe_blocks
from gemoe_cli.routing.baselines import RatioSkip, StaticK, TopP
from gemoe_cli.routing.modality import MODALITIES, placeholder_token_ids, token_modalities
from gemoe_cli.vlm import forward_module
from tests import tiny_vlms

SETTINGS = BenchSettings(prefill_batch_size=2, decode_batch_size=2, gen_len=3, warmup=0, sweep_points=3)
ADAPTIVE_POLICIES = ("static", "gemoe", "top_p", "ratio_skip", "static_k_minus_1")
QUANTILES = torch.tensor([0.3, 0.5, 0.7])


def encode(model_type: str, dataset: str, count: int):
    """Encode the first `count` samples of `dataset` with the tiny model's processor."""
    processor = tiny_vlms.processor(model_type)
    placeholders = {token for ids in placeholder_token_ids(tiny_vlms.config(model_type)).values() for token in ids}
    samples = read_image_text_samples(dataset)[:count]
    return [encode_sample(sample, processor, placeholders, max_images=None, max_tokens=None) for sample in samples]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one CPU thread: the tiny model gains nothing from more, and waits for busy cores with them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def modality_thresholds(model, batch) -> dict[str, dict[str, list[float]]]:
    """Return per-layer thresholds at `QUANTILES` of each modality's gating entropy on one sample."""
    entropies: dict[str, dict[int, torch.Tensor]] = {}
    with attach_adaptive_routing(model, {}) as routing, torch.no_grad():
        for path, layer in routing.layers.items():

            def keep(event, path=path):
                for code in event.modality.unique().tolist():
                    entropies.setdefault(path, {})[code] = event.entropy[event.modality == code]

            layer.observers.append(keep)
        forward_module(model)(**batch.inputs, use_cache=False)
    return {
        path: {MODALITIES[code]: torch.quantile(values, QUANTILES).tolist() for code, values in by_code.items()}
        for path, by_code in entropies.items()
    }


@pytest.fixture(scope="module")
def model():
    return tiny_vlms.build("qwen3_vl_moe")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    # Small photographs with short answers keep the many generations of exact-match agreement cheap.
    return encode("qwen3_vl_moe", tiny_vlms.write_photo_dataset(tmp_path_factory.mktemp("photos")), 3)


@pytest.fixture(scope="module")
def spec(model, samples) -> RoutingSpec:
    # A per-modality recipe: every token routes with its modality's thresholds, the shared ones stay -inf.
    by_modality = modality_thresholds(model, samples[0])
    shared = {path: [-math.inf] * 3 for path in by_modality}
    return RoutingSpec(shared, source="test thresholds", modality_thresholds=by_modality)


@pytest.fixture(scope="module")
def inputs(samples):
    # Prompts come from every sample, and the last one is also the evaluation set.
    return build_image_text_inputs(samples, samples[2:], SETTINGS)


@pytest.fixture(scope="module")
def benchmark(model, spec, inputs):
    """(record, logits on the first prompt before the benchmark)."""
    before = _logits(model, inputs.decode[0])
    return run_benchmark(model, spec, inputs, SETTINGS), before


def _logits(model, prompt):
    with torch.no_grad():
        return forward_module(model)(**prompt_arguments(prompt), use_cache=False).logits


def attach_policy(model, spec: RoutingSpec, name: str, record: dict):
    """Attach the named policy the way a user would, with the parameter from the record."""
    if name == "static":
        return attach_adaptive_routing(model, {})
    routing = spec.attach(model)
    parameter = record["policies"][name]["parameter"]
    baseline = {"top_p": TopP, "ratio_skip": RatioSkip, "static_k_minus_1": lambda k: StaticK(int(k))}.get(name)
    if baseline is not None:
        for layer in routing.layers.values():
            layer.baseline = baseline(parameter["value"])
    return routing


class ModalityPairCounter:
    """Forward pre-hooks on every experts module that count (token, expert) pairs by token modality.

    Registered after gemoe's own pre-hook, so they see the rewritten selection. Slots holding the sentinel
    index E are not pairs. `set_tokens(input_ids)` gives the modality of each token of the next forward pass,
    which the hooks read in the (B, S) order the experts see. `skip_first_call` leaves out each generation's
    prompt (the first call per layer after `set_tokens`).
    """

    def __init__(self, model, skip_first_call: bool = False):
        self.blocks = find_moe_blocks(model)
        self.placeholders = placeholder_token_ids(model.config)
        self.skip_first_call = skip_first_call
        self.active = dict.fromkeys(MODALITIES, 0)
        self.tokens = dict.fromkeys(MODALITIES, 0)
        self.codes = None
        self.calls = {}
        self.handles = []

    def set_tokens(self, input_ids):
        self.codes = token_modalities(input_ids, self.placeholders).reshape(-1)
        self.calls = {block.path: 0 for block in self.blocks}

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
            # Decode steps route one new text token per sequence; the prompt's tokens are known from set_tokens.
            codes = self.codes if self.calls[block.path] == 1 else torch.zeros(index.size(0), dtype=torch.int64)
            per_token = ((index >= 0) & (index < block.num_experts)).sum(-1)
            for code, name in enumerate(MODALITIES):
                self.active[name] += int(per_token[codes == code].sum())
                self.tokens[name] += int((codes == code).sum())
            return None

        return count

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def test_prefill_counts_prompt_tokens_and_images(benchmark, inputs, samples):
    record, _ = benchmark
    prompt_lengths = [sample.prompt_length for sample in samples[:2]]
    images = sum(sample.images for sample in samples[:2])
    assert record["inputs"]["kind"] == "image+text"
    assert record["inputs"]["prefill_prompt_tokens"] == prompt_lengths
    assert record["inputs"]["prefill_images"] == images
    assert record["inputs"]["prefill_shape"] is None
    for policy in record["policies"].values():
        prefill = policy["prefill"]
        assert prefill["tokens"] == sum(prompt_lengths)
        assert prefill["images"] == images
        assert prefill["passes"] == 2
        assert prefill["prompt_len"] is None
        for seconds, tokens_rate, samples_rate, images_rate in zip(
            prefill["seconds"]["values"],
            prefill["tokens_per_second"]["values"],
            prefill["samples_per_second"]["values"],
            prefill["images_per_second"]["values"],
            strict=True,
        ):
            assert tokens_rate == pytest.approx(sum(prompt_lengths) / seconds)
            assert samples_rate == pytest.approx(2 / seconds)
            assert images_rate == pytest.approx(images / seconds)


def test_prompts_cut_before_answer(inputs, samples):
    for prompt, sample in zip(inputs.prefill, samples, strict=False):
        assert prompt.input_ids.size(1) == sample.prompt_length
        assert torch.equal(prompt.input_ids, sample.input_ids[:, : sample.prompt_length])
        assert torch.equal(prompt.inputs["pixel_values"], sample.inputs["pixel_values"])


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_prefill_modality_sparsity_matches_independent_count(benchmark, model, spec, inputs, name):
    record, _ = benchmark
    with attach_policy(model, spec, name, record), ModalityPairCounter(model) as counter:
        for prompt in inputs.prefill:
            counter.set_tokens(prompt.input_ids)
            time_prefill(model, prompt)
    sparsity = record["policies"][name]["prefill"]["sparsity"]
    assert set(sparsity["modalities"]) == {"text", "image"}
    for modality, entry in sparsity["modalities"].items():
        assert entry["tokens"] == SETTINGS.repeats * counter.tokens[modality], modality
        assert entry["active_pairs"] == SETTINGS.repeats * counter.active[modality], modality
        assert entry["sparsity"] == pytest.approx(1 - counter.active[modality] / (4 * counter.tokens[modality]))
    assert sparsity["active_pairs"] == SETTINGS.repeats * sum(counter.active.values())


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_decode_counts_text_steps_only(benchmark, model, spec, inputs, name):
    record, _ = benchmark
    with attach_policy(model, spec, name, record), ModalityPairCounter(model, skip_first_call=True) as counter:
        for prompt in inputs.decode:
            counter.set_tokens(prompt.input_ids)
            time_decode(model, prompt, SETTINGS.gen_len)
    sparsity = record["policies"][name]["decode"]["sparsity"]
    steps = SETTINGS.decode_batch_size * (SETTINGS.gen_len - 1)
    assert counter.tokens["text"] == 2 * steps  # two MoE layers
    assert set(sparsity["modalities"]) == {"text"}
    assert sparsity["modalities"]["text"]["tokens"] == SETTINGS.repeats * 2 * steps
    assert sparsity["active_pairs"] == SETTINGS.repeats * counter.active["text"]


def test_decode_rates_count_sequential_samples(benchmark):
    record, _ = benchmark
    decode = record["policies"]["gemoe"]["decode"]
    steps = SETTINGS.gen_len - 1
    assert decode["passes"] == SETTINGS.decode_batch_size
    assert decode["timed_steps"] == steps
    for seconds, rate, per_token in zip(
        decode["seconds"]["values"],
        decode["tokens_per_second"]["values"],
        decode["seconds_per_token"]["values"],
        strict=True,
    ):
        assert rate == pytest.approx(SETTINGS.decode_batch_size * steps / seconds)
        assert per_token == pytest.approx(seconds / (SETTINGS.decode_batch_size * steps))


@pytest.mark.parametrize("name", ADAPTIVE_POLICIES)
def test_retention_matches_independent_evaluate(benchmark, model, spec, inputs, name):
    record, _ = benchmark
    with attach_policy(model, spec, name, record) as routing:
        evaluation = evaluate(model, routing, inputs.eval_batches)
    policy = record["policies"][name]
    assert policy["retention"] == pytest.approx(evaluation.retention("nll"), abs=1e-9)
    assert policy["evaluation"]["exact_match"] == evaluation.exact_match
    assert policy["evaluation"]["retention"]["exact_match"] == evaluation.exact_match
    assert policy["evaluation"]["modality_sparsity"] == pytest.approx(evaluation.modality_sparsity)
    modalities = policy["evaluation"]["sparsity"]["modalities"]
    for modality, value in evaluation.modality_sparsity.items():
        assert modalities[modality]["sparsity"] == pytest.approx(value, abs=1e-12)


def test_gemoe_uses_modality_thresholds(benchmark, model, spec, inputs):
    record, _ = benchmark
    with attach_adaptive_routing(model, spec.thresholds) as routing:
        shared_only = evaluate(model, routing, inputs.eval_batches)
    gemoe = record["policies"]["gemoe"]["evaluation"]["sparsity"]
    assert shared_only.sparsity == 0.0
    assert gemoe["overall"] > 0.1
    assert record["routing"]["per_modality"] is True
    assert record["summary"]["gemoe_modality_sparsity"] == {
        name: entry["sparsity"] for name, entry in gemoe["modalities"].items()
    }


def test_sweep_middle_point_is_recipe(benchmark):
    record, _ = benchmark
    middle = record["sweep"]["gemoe"][1]
    assert middle["parameter"] == 0.0
    assert middle["sparsity"] == pytest.approx(record["policies"]["gemoe"]["evaluation"]["sparsity"]["overall"])


def test_static_equals_native_on_image_prompt(benchmark):
    record, _ = benchmark
    static = record["policies"]["static"]
    assert static["retention"] == pytest.approx(1.0, abs=1e-9)
    assert static["evaluation"]["exact_match"] == 1.0
    assert record["policies"]["static_native"]["max_abs_logit_difference_vs_static"] < 1e-4


def test_model_restored_after_benchmark(benchmark, model, inputs):
    _, before = benchmark
    assert torch.equal(_logits(model, inputs.decode[0]), before)
    for block in find_moe_blocks(model):
        assert not block.experts._forward_pre_hooks
        assert not block.router._forward_hooks
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_exact_match_metric_needs_image_text_inputs():
    from gemoe_cli.bench.runner import build_inputs
    from gemoe_cli.errors import InvalidInputError
    from tests.tiny_models import build, input_ids

    settings = BenchSettings(prompt_len=8, gen_len=2, metric="exact_match")
    inputs = build_inputs(input_ids(1, 32).reshape(-1), [input_ids(2, 8)], settings)
    with pytest.raises(InvalidInputError, match="exact_match needs image\\+text data"):
        run_benchmark(build("olmoe"), RoutingSpec({}), inputs, settings)


def test_omni_prompts_run_through_thinker():
    model = tiny_vlms.build("qwen3_omni_moe")
    prompt = encode("qwen3_omni_moe", BUILTIN_IMAGES, 1)[0].prompt()

    with attach_adaptive_routing(model, {}) as routing:
        assert time_prefill(model, prompt) > 0
        prefill_counts = routing.counters()
        routing.reset_counters()
        timing = time_decode(model, prompt, gen_len=3)
        decode_counts = routing.counters()

    thinker_layer = "thinker.model.language_model.layers.0.mlp"
    assert prefill_counts[thinker_layer].tokens == prompt.input_ids.size(1)
    assert prefill_counts[thinker_layer].modality_tokens("image") > 100
    assert timing.decode_steps == 2
    assert decode_counts[thinker_layer].tokens == prompt.input_ids.size(1) + 2


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--metric", "exact_match", "--metric exact_match needs image+text data with answers"),
        ("--max-images", "0", "--max-images 0 is invalid; use 1 or more."),
    ],
)
def test_cli_rejects_invalid_image_options(tiny_model_dir, tiny_recipe, option, value, message):
    from typer.testing import CliRunner

    from gemoe_cli.cli.app import app

    result = CliRunner().invoke(app, ["bench", str(tiny_model_dir), "--recipe", str(tiny_recipe), option, value])

    assert result.exit_code == 2, result.output
    assert message in result.output
