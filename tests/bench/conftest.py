"""Fixtures for the bench tests: a saved tiny OLMoE with a tokenizer, and recipes fitted to its entropies."""

from pathlib import Path

import pytest
import torch

from gemoe_cli.api import model_identity
from gemoe_cli.calibration.data import read_samples
from gemoe_cli.recipe import LayerRecipe, Recipe, save_recipe
from gemoe_cli.routing import attach_adaptive_routing
from tests.tiny_models import build, input_ids

ENTROPY_QUANTILES = (0.3, 0.5, 0.7)
"""Quantiles of each layer's gating entropy used as its three thresholds (K = 4, k_min = 1)."""


def train_tokenizer():
    """Train a BPE tokenizer of at most 128 tokens on the built-in calibration text, ids 0-2 = pad, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    samples = [sample for sample in read_samples("builtin") if isinstance(sample, str)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=128, limit_alphabet=80, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"]
    )
    tokenizer.train_from_iterator(samples[:50], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def entropy_thresholds(model, ids: torch.Tensor) -> dict[str, list[float]]:
    """Return per-layer thresholds at `ENTROPY_QUANTILES` of the static model's gating entropy on `ids`."""
    entropies: dict[str, list[torch.Tensor]] = {}
    with attach_adaptive_routing(model, {}) as routing:
        for path, layer in routing.layers.items():
            layer.observers.append(lambda event, path=path: entropies.setdefault(path, []).append(event.entropy))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    levels = torch.tensor(ENTROPY_QUANTILES)
    return {path: torch.quantile(torch.cat(values), levels).tolist() for path, values in entropies.items()}


def fitted_recipe(model, name_or_path: str | None = None) -> Recipe:
    """Build a recipe for `model` from entropy quantiles on random token ids."""
    thresholds = entropy_thresholds(model, input_ids(4, 32, seed=7))
    return Recipe(
        model=model_identity(model, name_or_path=name_or_path),
        layers={path: LayerRecipe(thresholds=values) for path, values in thresholds.items()},
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny OLMoE (8 experts, top-4, two MoE layers) with a BPE tokenizer."""
    directory = tmp_path_factory.mktemp("bench") / "tiny-olmoe"
    build("olmoe").save_pretrained(directory)
    train_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_recipe(tiny_model_dir: Path) -> Path:
    """A recipe file for `tiny_model_dir`."""
    from gemoe_cli.models import load_model

    path = tiny_model_dir.parent / "tiny-olmoe.yaml"
    save_recipe(fitted_recipe(load_model(str(tiny_model_dir)), str(tiny_model_dir)), path)
    return path
