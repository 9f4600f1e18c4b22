"""Train and cache a small OLMoE-layout language model with learned routing, for tests and benchmarks.

The routers of a random-weight MoE model route by noise, so gating-entropy measurements need a trained
model. This module trains one offline on text that ships with CPython: the reference-manual topics in
`pydoc_data.topics` and the docstrings of a fixed list of pure-Python standard library modules, both
under the PSF License Version 2. The result lives in a cache directory whose name contains a hash of
everything that determines the weights, so an unchanged setup reuses it and any change retrains.

The steps are functions that work on their own: `load_corpus`, `split_corpus`, `train_tokenizer`,
`build_model`, `train_model`, `evaluate_language_model`. `ensure_reference_model` runs them once per
cache key. From the shell: `python -m gemoe_cli.reference_model --help`.

Legend for shape comments: B batch, T tokens per window, V vocabulary, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import OlmoeForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when a code change alters the trained weights or the contents of training.json, so old caches are not reused.
TRAINER_VERSION = 1

MODEL_DIR_PREFIX = "olmoe-reference-"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt",
                  "training.json")
CORPUS_LICENSE = "PSF-2.0 (Python Software Foundation License Version 2, as stated in CPython's LICENSE)"

# Pure-Python standard library modules whose docstrings join the corpus, in this order. None of them is among the
# modules that CPython 3.12 and 3.13 removed, but only CPython 3.11 was tried. A module that is not found is
# skipped and listed in the record. The sources are parsed with `ast`, never imported.
DOCSTRING_MODULES = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "bz2", "calendar", "cmd",
    "code", "codecs", "codeop", "collections", "compileall", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "dis", "doctest", "email.generator", "email.headerregistry", "email.message",
    "email.parser", "email.policy", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.metadata", "inspect",
    "io", "ipaddress", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "py_compile", "pyclbr", "pydoc", "queue", "random", "re", "rlcompleter", "runpy", "sched", "selectors",
    "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "ssl", "statistics",
    "string", "subprocess", "symtable", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "wsgiref.handlers", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "xmlrpc.client", "zipfile", "zipimport",
)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Renders `<|bos|><|user|>\nHi<|eos|>\n<|assistant|>\n`. The corpus has no dialogues, so the model never saw the
# role tokens: the template exists so that code which renders chat messages can run on this model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


@dataclasses.dataclass(frozen=True)
class ReferenceModelSettings:
    """Hyper-parameters of the corpus split, tokenizer, model and training run.

    With the corpus text and the library versions they determine the trained weights, so all of them enter
    the cache key. The defaults give a model of 3.9M parameters, 1.6M of them active per token.
    """

    seed: int = 0
    # Corpus split: paragraphs are grouped into chunks of up to `chunk_chars` characters, and every
    # `heldout_every`-th chunk is held out (1/20 = 5%).
    chunk_chars: int = 2000
    heldout_every: int = 20
    # Byte-level BPE vocabulary, special tokens included.
    vocab_size: int = 2048
    # OlmoeConfig. `intermediate_size` is the hidden size of each expert's MLP.
    hidden_size: int = 128
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 4
    # Training windows have `seq_len` tokens, so positions past it are never trained.
    max_position_embeddings: int = 512
    router_aux_loss_coef: float = 0.01
    # Training: AdamW, linear warm-up, then cosine decay to `min_learning_rate_ratio * learning_rate`.
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1500
    learning_rate: float = 3e-3
    min_learning_rate_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    experts_implementation: str = "grouped_mm"
    deterministic_algorithms: bool = True
    # Held-out evaluation during training (for the record only) and its batch size.
    heldout_eval_every: int = 250
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive = ("chunk_chars", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_experts", "num_experts_per_tok", "seq_len", "batch_size", "steps",
                    "heldout_eval_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.heldout_every < 2:
            problems.append(f"heldout_every={self.heldout_every} must be at least 2 so that some text is trained on")
        if self.vocab_size < 256 + len(ROLE_TOKENS) + 3:
            problems.append(f"vocab_size={self.vocab_size} must hold the 256 byte tokens and the special tokens")
        if self.num_experts_per_tok > self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of "
                            f"num_attention_heads={self.num_attention_heads}")
        if self.seq_len > self.max_position_embeddings:
            problems.append(f"seq_len={self.seq_len} exceeds max_position_embeddings={self.max_position_embeddings}")
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate} must be positive")
        if not 0 <= self.min_learning_rate_ratio <= 1:
            problems.append(f"min_learning_rate_ratio={self.min_learning_rate_ratio} must be in [0, 1]")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            problems.append(f"experts_implementation={self.experts_implementation!r} is not one of "
                            f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
        if problems:
            raise ValueError("invalid reference model settings: " + "; ".join(problems))


class CorpusSplitSettings(Protocol):
    """Settings that `split_corpus` reads: `ReferenceModelSettings` or the vision-language model's settings."""

    chunk_chars: int
    heldout_every: int


class LearningRateSchedule(Protocol):
    """Settings that `learning_rate_at` reads."""

    steps: int
    warmup_steps: int
    learning_rate: float
    min_learning_rate_ratio: float


# --- Corpus ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusDocument:
    """One text of the corpus and where it comes from, such as `pydoc_data.topics:assert` or `docstrings:json`."""

    source: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The corpus documents in a fixed order, and the modules of `DOCSTRING_MODULES` that were not found."""

    documents: tuple[CorpusDocument, ...]
    missing_modules: tuple[str, ...]

    @property
    def characters(self) -> int:
        return sum(len(document.text) for document in self.documents)

    def sha256(self) -> str:
        """Hash the sources and texts of all documents in order."""
        digest = hashlib.sha256()
        for document in self.documents:
            digest.update(document.source.encode() + b"\0" + document.text.encode() + b"\0")
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class CorpusSplit:
    """Training segments (runs of consecutive training chunks) and the held-out text."""

    train_segments: tuple[str, ...]
    heldout_text: str


def load_corpus() -> Corpus:
    """Collect the reference-manual topics of `pydoc_data.topics`, sorted by name, then the module docstrings."""
    from pydoc_data.topics import topics

    documents = [CorpusDocument(f"pydoc_data.topics:{name}", topics[name]) for name in sorted(topics)]
    missing = []
    for module in DOCSTRING_MODULES:
        source_path = _stdlib_source_path(module)
        if source_path is None:
            missing.append(module)
            continue
        docstrings = _collect_docstrings(source_path.read_text(encoding="utf-8"))
        if docstrings:
            documents.append(CorpusDocument(f"docstrings:{module}", "\n\n".join(docstrings)))
    if missing:
        logger.warning("standard library modules not found, left out of the corpus: %s", ", ".join(missing))
    return Corpus(tuple(documents), tuple(missing))


def _stdlib_source_path(module: str) -> Path | None:
    # The file is found by path because importlib reports no file for frozen modules (os, codecs, ... in 3.11).
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _collect_docstrings(source: str) -> list[str]:
    """Return the docstrings of a module, then of its classes and functions, depth first in source order."""
    docstrings = []

    def visit(node: ast.AST) -> None:
        docstring = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if docstring:
            docstrings.append(docstring)
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(ast.parse(source))
    return docstrings


def split_corpus(corpus: Corpus, settings: CorpusSplitSettings) -> CorpusSplit:
    """Cut each document into paragraph chunks and hold out every `heldout_every`-th chunk of the whole corpus.

    The held-out chunks are spread over all documents. Training text never spans a held-out chunk: the
    chunks on either side of it end up in separate training segments.
    """
    train_segments: list[str] = []
    heldout_chunks: list[str] = []
    chunk_index = 0
    for document in corpus.documents:
        current_segment: list[str] = []
        for chunk in _paragraph_chunks(document.text, settings.chunk_chars):
            if chunk_index % settings.heldout_every == settings.heldout_every // 2:
                heldout_chunks.append(chunk)
                if current_segment:
                    train_segments.append("\n\n".join(current_segment))
                current_segment = []
            else:
                current_segment.append(chunk)
            chunk_index += 1
        if current_segment:
            train_segments.append("\n\n".join(current_segment))
    return CorpusSplit(tuple(train_segments), "\n\n".join(heldout_chunks))


def _paragraph_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    # A single paragraph longer than chunk_chars becomes a chunk of its own.
    chunk: list[str] = []
    length = 0
    for paragraph in text.split("\n\n"):
        if chunk and length + len(paragraph) > chunk_chars:
            yield "\n\n".join(chunk)
            chunk, length = [], 0
        chunk.append(paragraph)
        length += len(paragraph) + 2
    if chunk:
        yield "\n\n".join(chunk)


# --- Tokenizer ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], settings: ReferenceModelSettings) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Encoding adds `<|bos|>` in front, as the training data has it. The tokenizer has pad, bos and eos tokens,
    the role tokens of `CHAT_TEMPLATE`, and that template.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(texts, settings.vocab_size, [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=settings.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def train_byte_level_bpe(texts: Sequence[str], vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts`. Special tokens get the ids 0, 1, 2, ... in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """Encode texts as one token stream: `<|bos|> text <|eos|>` for each text, concatenated."""
    import torch

    stream: list[int] = []
    # verbose=False silences the warning about texts longer than model_max_length, which is expected here
    # because the stream is cut into windows afterwards.
    for ids in tokenizer(list(texts), verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


# --- Model and training ------------------------------------------------------------------------------------


def build_model(settings: ReferenceModelSettings, tokenizer: PreTrainedTokenizerBase) -> OlmoeForCausalLM:
    """Build the untrained model, with weights drawn from torch's default generator (seed it first)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=settings.max_position_embeddings,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.num_experts_per_tok,
        router_aux_loss_coef=settings.router_aux_loss_coef,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        experts_implementation=settings.experts_implementation,
    )
    return OlmoeForCausalLM(config)


@contextlib.contextmanager
def seeded_torch(seed: int, deterministic_algorithms: bool) -> Iterator[None]:
    """Seed torch's CPU generator and set `torch.use_deterministic_algorithms`, restoring both on exit."""
    import torch

    previous_enabled = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(deterministic_algorithms, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_enabled, warn_only=previous_warn_only)


def learning_rate_at(step: int, settings: LearningRateSchedule) -> float:
    """Return the learning rate of a 0-based step: linear warm-up, then cosine decay to the minimum."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps - 1)
    minimum = settings.learning_rate * settings.min_learning_rate_ratio
    return minimum + (settings.learning_rate - minimum) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """Losses of a training run.

    `final_train_loss` and `final_aux_loss` are means over the last 50 steps. `loss_curve` contains (step, mean
    language-model loss of the last 100 steps), and `heldout_curve` contains (step, held-out loss, mean normalised
    gating entropy). `wall_time_s` excludes the held-out evaluations, which took `heldout_eval_time_s`.
    """

    final_train_loss: float
    final_aux_loss: float
    loss_curve: tuple[tuple[int, float], ...]
    heldout_curve: tuple[tuple[int, float, float], ...]
    wall_time_s: float
    heldout_eval_time_s: float
    tokens_seen: int


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Return OLMoE's load-balancing loss computed for each MoE layer on its own, averaged over layers.

    transformers' `OlmoeForCausalLM` pools the router logits of all layers into one loss (transformers 5.23), which
    lets a single layer starve an expert while the pooled load stays even. The value is `top_k` when every layer
    spreads its tokens and probability mass evenly. An `attention_mask` (B, T) leaves padding tokens out.
    """
    import torch
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    per_layer = [  # each logits tensor is (B * T, E)
        load_balancing_loss_func((logits,), num_experts, top_k, attention_mask) for logits in router_logits
    ]
    return torch.stack(per_layer).mean()


def train_model(
    model: OlmoeForCausalLM,
    train_tokens: torch.Tensor,
    settings: ReferenceModelSettings,
    *,
    generator: torch.Generator,
    heldout: torch.Tensor | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train `model` in place on random windows of `train_tokens`, drawn with `generator`.

    The loss is the next-token cross-entropy plus `router_aux_loss_coef` times `load_balancing_loss`. When
    `heldout` windows (N, T) are given, the model is evaluated on them every `heldout_eval_every` steps. The
    evaluation draws no random numbers, so the trained weights are the same with or without it.
    """
    import torch

    decay, no_decay = [], []
    for parameter in model.parameters():
        # RMSNorm weights (1-D) are not decayed. Embedding, router and expert weights are matrices and decay.
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
    )
    max_start = train_tokens.numel() - settings.seq_len
    if max_start < 1:
        raise ValueError(f"the training text has {train_tokens.numel()} tokens, fewer than seq_len + 1 = "
                         f"{settings.seq_len + 1}. Lower seq_len.")

    model.train()
    lm_losses: list[float] = []
    aux_losses: list[float] = []
    loss_curve: list[tuple[int, float]] = []
    heldout_curve: list[tuple[int, float, float]] = []
    eval_time = 0.0
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        starts = torch.randint(0, max_start, (settings.batch_size,), generator=generator)
        windows = torch.stack([train_tokens[start : start + settings.seq_len] for start in starts.tolist()])  # (B, T)

        lm_loss, aux_loss = _training_step(model, optimizer, windows, settings)
        lm_losses.append(lm_loss)
        aux_losses.append(aux_loss)
        done = step + 1
        if done % 100 == 0 or done == settings.steps:
            recent = statistics.fmean(lm_losses[-100:])
            loss_curve.append((done, round(recent, 4)))
            elapsed = time.perf_counter() - started - eval_time
            report_progress(progress, f"step {done}/{settings.steps}: loss {recent:.3f}, "
                                      f"aux loss {aux_losses[-1]:.3f}, lr {learning_rate_at(step, settings):.2e}, "
                                      f"{elapsed:.0f} s")
        if heldout is not None and (done % settings.heldout_eval_every == 0 or done == settings.steps):
            eval_started = time.perf_counter()
            evaluation = evaluate_language_model(model, heldout, settings.eval_batch_size)
            model.train()
            eval_time += time.perf_counter() - eval_started
            heldout_curve.append((done, round(evaluation.loss, 4), round(evaluation.mean_normalized_entropy, 4)))
            report_progress(progress, f"step {done}: held-out loss {evaluation.loss:.3f}, "
                                      f"normalised gating entropy {evaluation.mean_normalized_entropy:.3f}")
    model.eval()
    return TrainingResult(
        final_train_loss=statistics.fmean(lm_losses[-50:]),
        final_aux_loss=statistics.fmean(aux_losses[-50:]),
        loss_curve=tuple(loss_curve),
        heldout_curve=tuple(heldout_curve),
        wall_time_s=time.perf_counter() - started - eval_time,
        heldout_eval_time_s=eval_time,
        tokens_seen=settings.steps * settings.batch_size * settings.seq_len,
    )


def _training_step(
    model: OlmoeForCausalLM, optimizer: torch.optim.Optimizer, windows: torch.Tensor, settings: ReferenceModelSettings
) -> tuple[float, float]:
    """Run one optimiser step on windows (B, T) and return the language-model and load-balancing losses."""
    import torch

    output = model(input_ids=windows, output_router_logits=True, use_cache=False)
    lm_loss = _next_token_loss(output.logits, windows, reduction="mean")
    aux_loss = load_balancing_loss(output.router_logits, settings.num_experts, settings.num_experts_per_tok)
    loss = lm_loss + settings.router_aux_loss_coef * aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    return lm_loss.item(), aux_loss.item()


def _next_token_loss(logits: torch.Tensor, windows: torch.Tensor, reduction: str) -> torch.Tensor:
    import torch

    vocab = logits.shape[-1]
    predictions = logits[:, :-1].reshape(-1, vocab).float()  # (B * (T - 1), V)
    targets = windows[:, 1:].reshape(-1)  # (B * (T - 1),)
    return torch.nn.functional.cross_entropy(predictions, targets, reduction=reduction)


# --- Evaluation --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out language-model quality and routing statistics of one model.

    Normalised gating entropy is `H(softmax(router logits)) / log(E)`: 0 for a one-hot gate, 1 for a uniform one.
    `predicted_tokens` counts the next-token predictions, `T - 1` per window. `expert_load` contains, per MoE layer,
    the fraction of top-k slots that went to each expert (1/E when balanced).
    """

    loss: float
    perplexity: float
    predicted_tokens: int
    mean_normalized_entropy: float
    normalized_entropy_per_layer: tuple[float, ...]
    normalized_entropy_quantiles: dict[str, float]
    expert_load: tuple[tuple[float, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": round(self.loss, 4),
            "perplexity": round(self.perplexity, 2),
            "predicted_tokens": self.predicted_tokens,
            "mean_normalized_entropy": round(self.mean_normalized_entropy, 4),
            "normalized_entropy_per_layer": [round(value, 4) for value in self.normalized_entropy_per_layer],
            "normalized_entropy_quantiles": {key: round(value, 4) for key, value in
                                             self.normalized_entropy_quantiles.items()},
            "expert_load": [[round(value, 4) for value in layer] for layer in self.expert_load],
        }


def heldout_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> torch.Tensor:
    """Encode `text` as `<|bos|> text <|eos|>` and cut it into non-overlapping windows (N, T).

    The tail shorter than `seq_len` is dropped.
    """
    tokens = encode_documents(tokenizer, [text])
    count = tokens.numel() // seq_len
    if count == 0:
        raise ValueError(f"the held-out text has {tokens.numel()} tokens, fewer than seq_len={seq_len}. "
                         "Lower seq_len or hold out more text (a smaller heldout_every).")
    return tokens[: count * seq_len].view(count, seq_len)


def evaluate_language_model(model: OlmoeForCausalLM, windows: torch.Tensor, batch_size: int) -> Evaluation:
    """Measure next-token loss and gating entropy of `model` on token windows (N, T), without gradients."""
    import torch

    from gemoe_cli.routing.gating import gating_entropy

    num_experts = model.config.num_experts
    top_k = model.config.num_experts_per_tok
    total_loss = 0.0
    total_predictions = 0
    entropies: list[list[torch.Tensor]] = []  # per layer, normalised entropy of each token
    load_counts: list[torch.Tensor] = []  # per layer, (E,) number of top-k slots per expert
    model.eval()
    with torch.no_grad():
        for batch in windows.split(batch_size):
            output = model(input_ids=batch, output_router_logits=True, use_cache=False)
            total_loss += _next_token_loss(output.logits, batch, reduction="sum").item()
            total_predictions += batch.shape[0] * (batch.shape[1] - 1)
            for layer, router_logits in enumerate(output.router_logits):  # each (B * T, E)
                distribution = torch.softmax(router_logits.float(), dim=-1)
                normalized = gating_entropy(distribution) / math.log(num_experts)  # (B * T,)
                chosen = router_logits.topk(top_k, dim=-1).indices  # (B * T, K)
                counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).double()
                if layer == len(entropies):
                    entropies.append([])
                    load_counts.append(torch.zeros(num_experts, dtype=torch.float64))
                entropies[layer].append(normalized)
                load_counts[layer] += counts

    per_layer = [torch.cat(values) for values in entropies]
    pooled = torch.cat(per_layer).double()
    probabilities = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    quantiles = torch.quantile(pooled, probabilities).tolist()
    mean_loss = total_loss / total_predictions
    return Evaluation(
        loss=mean_loss,
        perplexity=math.exp(mean_loss),
        predicted_tokens=total_predictions,
        mean_normalized_entropy=pooled.mean().item(),
        normalized_entropy_per_layer=tuple(values.double().mean().item() for values in per_layer),
        normalized_entropy_quantiles={"p10": quantiles[0], "p50": quantiles[1], "p90": quantiles[2]},
        expert_load=tuple(tuple((counts / counts.sum()).tolist()) for counts in load_counts),
    )


def with_unit_variance_routers(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Return a copy of `model` whose router weights are redrawn from N(0, 1 / hidden_size).

    transformers initialises OLMoE and Qwen3-VL-MoE routers from N(0, 0.02**2), which gives near-uniform gates.
    Routers whose logits have a standard deviation near 1 are a stricter random baseline for gating entropy. The
    routers are the `mlp.gate` modules of the layers of `model.get_decoder()`.
    """
    import torch

    randomized = copy.deepcopy(model)
    std = 1.0 / math.sqrt(model.config.get_text_config().hidden_size)
    with torch.no_grad():
        for layer in randomized.get_decoder().layers:
            weight = layer.mlp.gate.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return randomized


# --- Cache -------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return `$GEMOE_CACHE` when set, else `~/.cache/gemoe`."""
    configured = os.environ.get("GEMOE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "gemoe"


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "tokenizers": importlib.metadata.version("tokenizers"),
    }


def reference_model_key(settings: ReferenceModelSettings, corpus_sha256: str) -> str:
    """Return a 12-hex-digit hash of the settings, the corpus text, the library versions and `TRAINER_VERSION`.

    NOTE: the CPU model and the number of torch threads are not part of the key, although float results
    can differ between machines.
    """
    payload = {
        "trainer_version": TRAINER_VERSION,
        "settings": dataclasses.asdict(settings),
        "corpus_sha256": corpus_sha256,
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def reference_model_path(cache_dir: Path | None = None, settings: ReferenceModelSettings | None = None) -> Path:
    """Return the directory of the model for these settings, whether or not it exists yet. Nothing is trained."""
    settings = settings or ReferenceModelSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / (MODEL_DIR_PREFIX + reference_model_key(settings, load_corpus().sha256()))


def is_complete_model_dir(directory: Path, required_files: Sequence[str] = REQUIRED_FILES) -> bool:
    """Return whether `directory` has every file of `required_files`."""
    return all((directory / file_name).is_file() for file_name in required_files)


def ensure_reference_model(
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    settings: ReferenceModelSettings | None = None,
) -> Path:
    """Return the directory of the trained reference model, training it first when the cache lacks it.

    The directory contains `config.json`, `model.safetensors`, the tokenizer files, `heldout.txt` and
    `training.json`. Training runs in a hidden sibling directory that is renamed into place at the end, so an
    interrupted run leaves no partial model under the final name. A lock file serialises training between
    processes that share the cache. `force` retrains even when the cache has the model. Progress lines go to
    stderr when `progress` is true.

    NOTE: when other processes share the cores, set `OMP_WAIT_POLICY=PASSIVE` before torch is imported, as
    `scripts/train_reference_model` does. With the default policy, training was 10 times slower on a busy
    2-core machine, and the weights were the same.
    """
    settings = settings or ReferenceModelSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = load_corpus()
    key = reference_model_key(settings, corpus.sha256())

    def build(partial: Path) -> None:
        build_reference_model(partial, settings, corpus, key=key, progress=progress)

    target = ensure_cached_build(cache_dir, MODEL_DIR_PREFIX + key, REQUIRED_FILES, build, progress=progress,
                                 force=force)
    return target


def ensure_cached_build(
    cache_dir: Path,
    name: str,
    required_files: Sequence[str],
    build: Callable[[Path], object],
    *,
    progress: bool,
    force: bool,
) -> Path:
    """Return `cache_dir / name`, first calling `build(partial_dir)` when it lacks a file of `required_files`.

    `build` writes the model into an empty hidden sibling directory, which is renamed to `name` once `build`
    returns, so an interrupted build leaves nothing under the final name. An exclusive lock on `name.lock`
    serialises builds between processes, and a process that waited for it reuses the other's model. `force`
    builds again even when the directory is complete.
    """
    target = cache_dir / name
    if not force and is_complete_model_dir(target, required_files):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{name}.lock", progress):
        # Another process may have finished training while this one waited for the lock.
        if not force and is_complete_model_dir(target, required_files):
            return target
        _remove_partial_builds(cache_dir, name)
        partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache_dir))
        try:
            build(partial)
            _replace_directory(partial, target)
        finally:
            if partial.exists():
                shutil.rmtree(partial)
    report_progress(progress, f"model saved to {target}")
    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, progress: bool) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report_progress(progress, f"waiting for {lock_path}: another process is training this model")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_partial_builds(cache_dir: Path, name: str) -> None:
    # Only the lock holder builds or replaces a model under this name, so any partial build or retired old model
    # found here was left by a killed process.
    for pattern in (f".{name}.partial-*", f".{name}.old-*"):
        for stale in cache_dir.glob(pattern):
            logger.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _replace_directory(source: Path, target: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so an old model is first renamed out of the way.
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(source, target)
        shutil.rmtree(retired)
    else:
        os.replace(source, target)


def build_reference_model(
    output_dir: Path,
    settings: ReferenceModelSettings,
    corpus: Corpus,
    *,
    key: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tokenizer and model, evaluate them, write all files into `output_dir`, and return the record."""
    import torch

    started = time.perf_counter()
    split = split_corpus(corpus, settings)
    tokenizer = train_tokenizer(split.train_segments, settings)
    train_tokens = encode_documents(tokenizer, split.train_segments)
    windows = heldout_windows(tokenizer, split.heldout_text, settings.seq_len)
    report_progress(progress, f"corpus: {corpus.characters:,} characters, {train_tokens.numel():,} training "
                              f"tokens, {windows.numel():,} held-out tokens")

    with seeded_torch(settings.seed, settings.deterministic_algorithms):
        model = build_model(settings, tokenizer)
        generator = torch.Generator().manual_seed(settings.seed)
        random_init = evaluate_language_model(model, windows, settings.eval_batch_size)
        unit_routers = evaluate_language_model(with_unit_variance_routers(model, generator), windows,
                                               settings.eval_batch_size)
        report_progress(progress, f"training {count_parameters(model):,} parameters for {settings.steps} steps "
                                  f"of {settings.batch_size} x {settings.seq_len} tokens")
        training = train_model(model, train_tokens, settings, generator=generator, heldout=windows,
                               progress=progress)
        trained = evaluate_language_model(model, windows, settings.eval_batch_size)

    with transformers_progress_bars(progress):
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "heldout.txt").write_text(split.heldout_text, encoding="utf-8")
    record = _training_record(
        key=key,
        settings=settings,
        corpus=corpus,
        split=split,
        train_tokens=train_tokens.numel(),
        heldout_tokens=windows.numel(),
        model=model,
        training=training,
        evaluations={"trained": trained, "random_init": random_init, "random_unit_variance_routers": unit_routers},
        wall_time_s=time.perf_counter() - started,
    )
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' progress bars inside the block unless `enabled`, and restore the previous setting."""
    from transformers.utils import logging as transformers_logging

    previously_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previously_enabled:
            transformers_logging.enable_progress_bar()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _training_record(
    *,
    key: str,
    settings: ReferenceModelSettings,
    corpus: Corpus,
    split: CorpusSplit,
    train_tokens: int,
    heldout_tokens: int,
    model: OlmoeForCausalLM,
    training: TrainingResult,
    evaluations: dict[str, Evaluation],
    wall_time_s: float,
) -> dict[str, Any]:
    import torch

    expert_parameters = sum(parameter.numel() for name, parameter in model.named_parameters() if ".experts." in name)
    total_parameters = count_parameters(model)
    active_parameters = total_parameters - expert_parameters * (1 - settings.num_experts_per_tok / settings.num_experts)
    return {
        "trainer_version": TRAINER_VERSION,
        "cache_key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "parameters": {"total": total_parameters, "active_per_token": int(active_parameters)},
        "corpus": {
            "sources": ["pydoc_data.topics (CPython reference manual topics)",
                        "docstrings of the pure-Python standard library modules listed in stdlib_modules"],
            "license": CORPUS_LICENSE,
            "python_version": platform.python_version(),
            "sha256": corpus.sha256(),
            "documents": len(corpus.documents),
            "characters": corpus.characters,
            "stdlib_modules": [module for module in DOCSTRING_MODULES if module not in corpus.missing_modules],
            "missing_modules": list(corpus.missing_modules),
            "train_characters": sum(len(segment) for segment in split.train_segments),
            "heldout_characters": len(split.heldout_text),
            "train_tokens": train_tokens,
            "heldout_tokens": heldout_tokens,
        },
        "training": {
            "final_train_loss": round(training.final_train_loss, 4),
            "final_aux_loss": round(training.final_aux_loss, 4),
            "loss_curve": [list(point) for point in training.loss_curve],
            "heldout_curve": [list(point) for point in training.heldout_curve],
            "heldout_eval_time_s": round(training.heldout_eval_time_s, 1),
            "tokens_seen": training.tokens_seen,
            "training_wall_time_s": round(training.wall_time_s, 1),
            "total_wall_time_s": round(wall_time_s, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "evaluation": {
            "method": "next-token loss over non-overlapping windows of seq_len tokens of `<|bos|> heldout.txt <|eos|>`",
            **{name: evaluation.to_json() for name, evaluation in evaluations.items()},
        },
        "versions": library_versions(),
    }


# --- Experts implementation timing -------------------------------------------------------------------------


def time_experts_implementations(
    settings: ReferenceModelSettings,
    implementations: Sequence[str] = EXPERTS_IMPLEMENTATIONS,
    steps: int = 5,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Time training steps of the reference architecture with each experts implementation.

    Each implementation runs one warm-up step, then `steps` timed steps on random tokens with the batch size,
    sequence length and determinism of `settings`. Returns seconds per step (min, median, max) per implementation.
    """
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    placeholder = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(settings.vocab_size)}, unk_token="t0")),
        pad_token="t0", bos_token="t1", eos_token="t2",
    )
    results = {}
    for implementation in implementations:
        timed_settings = dataclasses.replace(settings, experts_implementation=implementation)
        with seeded_torch(settings.seed, settings.deterministic_algorithms):
            model = build_model(timed_settings, placeholder)
            optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                          betas=(settings.adam_beta1, settings.adam_beta2))
            generator = torch.Generator().manual_seed(settings.seed)
            durations: list[float] = []
            for step in range(steps + 1):
                windows = torch.randint(0, settings.vocab_size, (settings.batch_size, settings.seq_len),
                                        generator=generator)
                step_started = time.perf_counter()
                _training_step(model, optimizer, windows, timed_settings)
                if step >= 1:
                    durations.append(time.perf_counter() - step_started)
        results[implementation] = {"min_s": min(durations), "median_s": statistics.median(durations),
                                   "max_s": max(durations)}
        report_progress(progress, f"{implementation}: median {results[implementation]['median_s']:.3f} s per step")
    return results


# --- Command line ------------------------------------------------------------------------------------------


def report_progress(progress: bool, message: str) -> None:
    """Print `message` to stderr when `progress` is true."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def format_summary(model_dir: Path) -> str:
    """Render the numbers of a model directory's `training.json` as a few lines of text."""
    record = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
    settings = record["settings"]
    corpus = record["corpus"]
    training = record["training"]
    evaluation = record["evaluation"]
    trained, random_init = evaluation["trained"], evaluation["random_init"]
    unit_routers = evaluation["random_unit_variance_routers"]
    return "\n".join([
        f"reference model: {model_dir}",
        f"parameters: {record['parameters']['total']:,} ({record['parameters']['active_per_token']:,} active per "
        f"token), {settings['num_hidden_layers']} layers, {settings['num_experts']} experts, "
        f"top-{settings['num_experts_per_tok']}",
        f"corpus: {corpus['characters']:,} characters, {corpus['train_tokens']:,} training tokens, "
        f"{corpus['heldout_tokens']:,} held-out tokens (Python {corpus['python_version']})",
        f"training: {settings['steps']} steps in {training['training_wall_time_s']:.0f} s on "
        f"{training['torch_threads']} torch threads, final train loss {training['final_train_loss']:.3f}",
        f"held-out loss: trained {trained['loss']:.3f} (perplexity {trained['perplexity']:.1f}), "
        f"random init {random_init['loss']:.3f} (perplexity {random_init['perplexity']:.1f})",
        f"normalised gating entropy: trained {trained['mean_normalized_entropy']:.3f}, "
        f"random init {random_init['mean_normalized_entropy']:.3f}, "
        f"random unit-variance routers {unit_routers['mean_normalized_entropy']:.3f}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_reference_model",
        description="Train the small OLMoE reference model with learned routing, or reuse the cached one, "
                    "and print where it is and its numbers.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="directory of cached models (default: $GEMOE_CACHE, else ~/.cache/gemoe)")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has the model")
    parser.add_argument("--quiet", action="store_true", help="print no progress lines on stderr")
    parser.add_argument("--time-experts-implementations", metavar="STEPS", type=int, default=None,
                        help="instead of training, time STEPS training steps with each experts implementation "
                             f"({', '.join(EXPERTS_IMPLEMENTATIONS)}) and print seconds per step")
    args = parser.parse_args(argv)

    if args.time_experts_implementations is not None:
        if args.time_experts_implementations < 1:
            parser.error("--time-experts-implementations must be at least 1")
        timings = time_experts_implementations(ReferenceModelSettings(), steps=args.time_experts_implementations,
                                               progress=not args.quiet)
        for implementation, timing in timings.items():
            print(f"{implementation}: {timing['median_s']:.3f} s per step (median, min {timing['min_s']:.3f}, "
                  f"max {timing['max_s']:.3f})")
        return 0

    model_dir = ensure_reference_model(args.cache_dir, progress=not args.quiet, force=args.force)
    print(format_summary(model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
