"""Tests of the reference model trainer.

The tests that use `reference_model_dir` train the real reference model when the cache lacks it (several
minutes on a CPU) and reuse it afterwards. The other tests build tiny models in temporary directories and stay
quick.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gemoe_cli import reference_model
from gemoe_cli.reference_model import (
    Corpus,
    CorpusDocument,
    ReferenceModelSettings,
    ensure_reference_model,
    learning_rate_at,
    split_corpus,
)

# Training the real model takes minutes and counts against the timeout of the first test that needs it.
pytestmark = pytest.mark.timeout(3600)

# A model small enough that a whole build, held-out evaluation included, takes seconds.
TINY_SETTINGS = ReferenceModelSettings(
    vocab_size=300,
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=32,
    seq_len=32,
    batch_size=2,
    steps=3,
    warmup_steps=1,
    eval_batch_size=64,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference_model"


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run each test's torch work on one thread, then restore the thread count.

    The tiny models gain nothing from more threads. On a 2-core machine busy with other processes, a tiny build
    took 40 s with 2 threads and 3 s with 1, because idle OpenMP threads spin while waiting for a core.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference_model_dir() -> Path:
    # Training runs in a child process through the script, which sets OMP_WAIT_POLICY=PASSIVE before torch is
    # loaded. This process has loaded torch already, and on a busy machine the default policy trains 10 times
    # slower.
    if not reference_model.is_complete_model_dir(reference_model.reference_model_path()):
        completed = subprocess.run([str(SCRIPT)], capture_output=True, text=True,
                                   env={**os.environ, "PYTHON": sys.executable})
        assert completed.returncode == 0, completed.stderr[-4000:]
    return ensure_reference_model(progress=False)


@pytest.fixture(scope="session")
def training_record(reference_model_dir: Path) -> dict:
    return json.loads((reference_model_dir / "training.json").read_text(encoding="utf-8"))


# --- The trained reference model ------------------------------------------------------------------------------


def test_directory_has_required_files(reference_model_dir: Path) -> None:
    for file_name in reference_model.REQUIRED_FILES:
        assert (reference_model_dir / file_name).is_file(), file_name
    assert reference_model_dir.name.startswith(reference_model.MODEL_DIR_PREFIX)


def test_loads_offline_with_auto_classes(reference_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir, local_files_only=True)

    assert model.config.model_type == "olmoe"
    assert model.config.num_experts == 16
    assert model.config.num_experts_per_tok == 4
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id is not None
    assert tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id is not None

    inputs = tokenizer("The with statement is used to wrap the execution of a block", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_extends_prompt(reference_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir, local_files_only=True)
    inputs = tokenizer("Return a new list", return_tensors="pt")

    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_chat_template_renders(reference_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is a tuple?<|eos|>\n<|assistant|>\n"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_trained_gating_entropy_below_random(training_record: dict) -> None:
    evaluation = training_record["evaluation"]
    trained = evaluation["trained"]["mean_normalized_entropy"]

    assert 0.0 < trained < 1.0
    # A learned router is much more confident than transformers' near-uniform initialisation (about 1.0) and
    # than random routers with unit-variance logits.
    assert trained < evaluation["random_init"]["mean_normalized_entropy"] - 0.1
    assert trained < evaluation["random_unit_variance_routers"]["mean_normalized_entropy"] - 0.05
    for layer_entropy in evaluation["trained"]["normalized_entropy_per_layer"]:
        assert layer_entropy < evaluation["random_init"]["mean_normalized_entropy"]


def test_trained_tokens_differ_in_entropy(training_record: dict) -> None:
    # Adaptive routing needs confident and uncertain tokens side by side.
    quantiles = training_record["evaluation"]["trained"]["normalized_entropy_quantiles"]
    assert quantiles["p10"] < quantiles["p50"] < quantiles["p90"]
    assert quantiles["p90"] - quantiles["p10"] > 0.1


def test_all_experts_receive_tokens(training_record: dict) -> None:
    for layer_load in training_record["evaluation"]["trained"]["expert_load"]:
        assert len(layer_load) == 16
        assert math.isclose(sum(layer_load), 1.0, abs_tol=1e-3)
        # Balanced load is 1/16 per expert. The load-balancing loss keeps every expert in use.
        assert min(layer_load) > 0.01


def test_heldout_perplexity_below_random(training_record: dict) -> None:
    evaluation = training_record["evaluation"]
    trained = evaluation["trained"]
    random_init = evaluation["random_init"]

    assert trained["perplexity"] < random_init["perplexity"] / 10
    assert trained["perplexity"] < 60
    assert math.isclose(trained["perplexity"], math.exp(trained["loss"]), rel_tol=1e-2)
    assert training_record["training"]["final_train_loss"] < random_init["loss"]


def test_record_describes_run(training_record: dict, reference_model_dir: Path) -> None:
    settings = training_record["settings"]
    corpus = training_record["corpus"]
    training = training_record["training"]

    assert settings == json.loads(json.dumps(dataclasses.asdict(ReferenceModelSettings())))
    assert settings["seed"] == 0
    assert reference_model_dir.name.endswith(training_record["cache_key"])
    assert corpus["license"].startswith("PSF-2.0")
    assert corpus["train_tokens"] > 100_000
    assert corpus["heldout_tokens"] > 5_000
    assert training["training_wall_time_s"] > 0
    assert set(training_record["versions"]) == {"python", "torch", "transformers", "tokenizers"}
    assert training_record["parameters"]["total"] > 1_000_000


def test_heldout_text_matches_split(reference_model_dir: Path) -> None:
    split = split_corpus(reference_model.load_corpus(), ReferenceModelSettings())
    saved = (reference_model_dir / "heldout.txt").read_text(encoding="utf-8")

    assert saved == split.heldout_text
    heldout_share = len(saved) / (len(saved) + sum(len(segment) for segment in split.train_segments))
    assert 0.03 < heldout_share < 0.08


def test_second_call_is_cache_hit(reference_model_dir: Path) -> None:
    weights = reference_model_dir / "model.safetensors"
    modified_before = weights.stat().st_mtime_ns

    started = time.perf_counter()
    again = ensure_reference_model(progress=False)
    elapsed = time.perf_counter() - started

    assert again == reference_model_dir
    assert weights.stat().st_mtime_ns == modified_before
    assert elapsed < 15


# --- Corpus, schedule and settings ----------------------------------------------------------------------------


def test_corpus_is_deterministic() -> None:
    first = reference_model.load_corpus()
    second = reference_model.load_corpus()

    assert first.sha256() == second.sha256()
    assert first.documents[0].source.startswith("pydoc_data.topics:")
    assert any(document.source == "docstrings:argparse" for document in first.documents)
    assert first.characters > 500_000


def test_collect_docstrings_in_source_order() -> None:
    source = '''
"""Module doc."""

class Outer:
    """Outer doc."""

    def method(self):
        """Method doc."""

    def undocumented(self):
        pass

async def later():
    """Async doc."""
'''
    assert reference_model._collect_docstrings(source) == ["Module doc.", "Outer doc.", "Method doc.", "Async doc."]


def test_split_holds_out_every_nth_chunk() -> None:
    paragraphs = [f"paragraph {index:03d}" for index in range(100)]
    corpus = Corpus((CorpusDocument("test:one", "\n\n".join(paragraphs)),), missing_modules=())
    # Each 13-character paragraph fills one chunk of at most 14 characters.
    settings = ReferenceModelSettings(chunk_chars=14, heldout_every=10)

    split = split_corpus(corpus, settings)

    heldout = split.heldout_text.split("\n\n")
    assert heldout == [f"paragraph {index:03d}" for index in range(5, 100, 10)]
    trained = [paragraph for segment in split.train_segments for paragraph in segment.split("\n\n")]
    assert sorted(trained + heldout) == paragraphs
    # A training segment never spans a held-out chunk.
    assert split.train_segments[0] == "\n\n".join(paragraphs[:5])
    assert len(split.train_segments) == 11


def test_learning_rate_schedule() -> None:
    settings = ReferenceModelSettings(steps=11, warmup_steps=2, learning_rate=1.0, min_learning_rate_ratio=0.1)

    assert learning_rate_at(0, settings) == pytest.approx(0.5)
    assert learning_rate_at(1, settings) == pytest.approx(1.0)
    assert learning_rate_at(2, settings) == pytest.approx(1.0)
    # Halfway through the cosine decay, the rate is midway between the maximum and the minimum.
    assert learning_rate_at(6, settings) == pytest.approx(0.55)
    assert learning_rate_at(10, settings) == pytest.approx(0.1)


def test_settings_report_every_problem() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok=5 exceeds num_experts=4") as raised:
        ReferenceModelSettings(num_experts=4, num_experts_per_tok=5, hidden_size=30, experts_implementation="x")
    message = str(raised.value)
    assert "hidden_size=30 is not a multiple of num_attention_heads=4" in message
    assert "experts_implementation='x'" in message


def test_tokenizer_training_is_deterministic() -> None:
    texts = reference_model.split_corpus(reference_model.load_corpus(), TINY_SETTINGS).train_segments[:200]

    first = reference_model.train_tokenizer(texts, TINY_SETTINGS)
    second = reference_model.train_tokenizer(texts, TINY_SETTINGS)

    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == TINY_SETTINGS.vocab_size


def test_heldout_evaluation_leaves_training_unchanged() -> None:
    settings = dataclasses.replace(TINY_SETTINGS, steps=4, heldout_eval_every=2)
    split = split_corpus(reference_model.load_corpus(), settings)
    tokenizer = reference_model.train_tokenizer(split.train_segments[:200], settings)
    train_tokens = reference_model.encode_documents(tokenizer, split.train_segments[:200])
    heldout = reference_model.heldout_windows(tokenizer, split.heldout_text[:20_000], settings.seq_len)

    states = []
    curves = []
    for windows in (None, heldout):
        with reference_model.seeded_torch(settings.seed, settings.deterministic_algorithms):
            model = reference_model.build_model(settings, tokenizer)
            generator = torch.Generator().manual_seed(settings.seed)
            result = reference_model.train_model(model, train_tokens, settings, generator=generator,
                                                 heldout=windows, progress=False)
        states.append(model.state_dict())
        curves.append(result.heldout_curve)

    assert curves[0] == ()
    assert [point[0] for point in curves[1]] == [2, 4]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_load_balancing_loss_is_per_layer() -> None:
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    # Layer 0 sends every token to experts 0 and 1, layer 1 to experts 2 and 3. Per layer, the share of top-k
    # slots is f = (1, 1, 0, 0) and the mean gate is P = (0.5, 0.5, 0, 0), so E * sum(f * P) = 4 * 1 = 4.
    # Pooled over both layers, f = (0.5, 0.5, 0.5, 0.5) and P = (0.25, ...), which scores top_k = 2 as if balanced.
    first = torch.tensor([[5.0, 5.0, -5.0, -5.0]]).repeat(8, 1)
    second = torch.tensor([[-5.0, -5.0, 5.0, 5.0]]).repeat(8, 1)

    per_layer = reference_model.load_balancing_loss((first, second), num_experts=4, top_k=2)
    pooled = load_balancing_loss_func((first, second), num_experts=4, top_k=2)

    assert per_layer.item() == pytest.approx(4.0, rel=1e-3)
    assert pooled.item() == pytest.approx(2.0, rel=1e-3)


def test_load_balancing_loss_leaves_out_padding() -> None:
    # Two real tokens go to experts 0 and 1, two padding tokens to experts 2 and 3. Without the padding every
    # slot goes to experts 0 and 1, which scores E * sum(f * P) = 4 * 1 = 4. With it the load looks even (2).
    logits = torch.tensor([[5.0, 5.0, -5.0, -5.0]] * 2 + [[-5.0, -5.0, 5.0, 5.0]] * 2)
    mask = torch.tensor([[1, 1, 0, 0]])

    masked = reference_model.load_balancing_loss((logits,), num_experts=4, top_k=2, attention_mask=mask)
    unmasked = reference_model.load_balancing_loss((logits,), num_experts=4, top_k=2)

    assert masked.item() == pytest.approx(4.0, rel=1e-3)
    assert unmasked.item() == pytest.approx(2.0, rel=1e-3)


def test_default_cache_dir_reads_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEMOE_CACHE", str(tmp_path))
    assert reference_model.default_cache_dir() == tmp_path

    monkeypatch.delenv("GEMOE_CACHE")
    assert reference_model.default_cache_dir() == Path.home() / ".cache" / "gemoe"


def test_key_depends_on_settings_and_corpus() -> None:
    key = reference_model.reference_model_key(TINY_SETTINGS, "a" * 64)

    assert key == reference_model.reference_model_key(TINY_SETTINGS, "a" * 64)
    assert key != reference_model.reference_model_key(TINY_SETTINGS, "b" * 64)
    changed = dataclasses.replace(TINY_SETTINGS, seed=1)
    assert key != reference_model.reference_model_key(changed, "a" * 64)


# --- Cache behaviour, on tiny models ---------------------------------------------------------------------------


def _partial_dirs(cache_dir: Path) -> list[Path]:
    return [path for path in cache_dir.iterdir() if path.name.startswith(".")]


def test_tiny_build_is_cached(tmp_path: Path) -> None:
    first = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)
    modified = (first / "model.safetensors").stat().st_mtime_ns

    second = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)

    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == modified
    assert _partial_dirs(tmp_path) == []
    record = json.loads((first / "training.json").read_text(encoding="utf-8"))
    assert record["settings"]["steps"] == TINY_SETTINGS.steps
    assert set(record["evaluation"]) >= {"trained", "random_init", "random_unit_variance_routers"}


def test_tiny_build_is_reproducible(tmp_path: Path) -> None:
    first = ensure_reference_model(tmp_path / "a", progress=False, settings=TINY_SETTINGS)
    second = ensure_reference_model(tmp_path / "b", progress=False, settings=TINY_SETTINGS)

    assert first.name == second.name
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_changed_settings_use_new_directory(tmp_path: Path) -> None:
    first = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)
    changed = dataclasses.replace(TINY_SETTINGS, steps=4)

    second = ensure_reference_model(tmp_path, progress=False, settings=changed)

    assert second != first
    assert first.is_dir()
    assert json.loads((second / "training.json").read_text(encoding="utf-8"))["settings"]["steps"] == 4


def test_force_rebuilds_in_place(tmp_path: Path) -> None:
    first = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)
    created = json.loads((first / "training.json").read_text(encoding="utf-8"))["created"]
    (first / "marker").write_text("old build", encoding="utf-8")

    rebuilt = ensure_reference_model(tmp_path, progress=False, force=True, settings=TINY_SETTINGS)

    assert rebuilt == first
    assert not (rebuilt / "marker").exists()
    assert json.loads((rebuilt / "training.json").read_text(encoding="utf-8"))["created"] >= created
    assert _partial_dirs(tmp_path) == []


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_during_training(output_dir: Path, *args, **kwargs) -> dict:
        (output_dir / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(reference_model, "build_reference_model", fail_during_training)

    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)
    assert [path for path in tmp_path.iterdir() if path.suffix != ".lock"] == []


def test_stale_partial_build_is_removed(tmp_path: Path) -> None:
    key = reference_model.reference_model_key(TINY_SETTINGS, reference_model.load_corpus().sha256())
    name = f"{reference_model.MODEL_DIR_PREFIX}{key}"
    stale_build = tmp_path / f".{name}.partial-killed"
    stale_old_model = tmp_path / f".{name}.old-killed"
    for stale in (stale_build, stale_old_model):
        stale.mkdir()
        (stale / "config.json").write_text("{}", encoding="utf-8")

    ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)

    assert not stale_build.exists()
    assert not stale_old_model.exists()
    assert (tmp_path / name).is_dir()


def test_build_waits_for_lock(tmp_path: Path) -> None:
    key = reference_model.reference_model_key(TINY_SETTINGS, reference_model.load_corpus().sha256())
    target = tmp_path / f"{reference_model.MODEL_DIR_PREFIX}{key}"
    results: list[Path] = []

    with open(tmp_path / f"{target.name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: results.append(ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS))
        )
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive()
        assert not target.exists()
        fcntl.flock(lock_file, fcntl.LOCK_UN)

    worker.join(timeout=600)
    assert results == [target]
    assert target.is_dir()


def test_format_summary_lists_numbers(tmp_path: Path) -> None:
    model_dir = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)

    summary = reference_model.format_summary(model_dir)

    assert f"reference model: {model_dir}" in summary
    assert "held-out loss: trained" in summary
    assert "normalised gating entropy: trained" in summary


def test_script_prints_cached_model(reference_model_dir: Path) -> None:
    completed = subprocess.run(
        [str(SCRIPT), "--cache-dir", str(reference_model_dir.parent), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )

    assert completed.returncode == 0, completed.stderr
    assert f"reference model: {reference_model_dir}" in completed.stdout
    assert "normalised gating entropy: trained" in completed.stdout


def test_script_help_lists_options() -> None:
    completed = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHON": sys.executable})

    assert completed.returncode == 0, completed.stderr
    for option in ("--cache-dir", "--force", "--quiet", "--time-experts-implementations"):
        assert option in completed.stdout


@pytest.mark.parametrize("failing_file", ["model.safetensors", "training.json"])
def test_full_disk_keeps_cached_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_file: str) -> None:
    from gemoe_cli.atomic import is_disk_full
    from tests.write_faults import FaultyDisk, snapshot

    cached = ensure_reference_model(tmp_path, progress=False, settings=TINY_SETTINGS)
    before = snapshot(cached)
    disk = FaultyDisk(tmp_path, 100, file=failing_file).install(monkeypatch)

    with pytest.raises(Exception) as raised:
        ensure_reference_model(tmp_path, progress=False, force=True, settings=TINY_SETTINGS)

    assert is_disk_full(raised.value), repr(raised.value)
    assert disk.failed == [failing_file]
    assert snapshot(cached) == before
    assert _partial_dirs(tmp_path) == []
