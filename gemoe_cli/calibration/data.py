"""Calibration data: read text samples, tokenize, pack into fixed-length blocks, split fit / held-out.

Sources, chosen with `--dataset`:
- ``builtin`` (default): the calibration set shipped with gemoe (`data/builtin.jsonl`);
- a ``.txt`` file (samples separated by blank lines) or a folder of them;
- a ``.jsonl`` file with a ``text`` field or chat ``messages`` per line (rendered with the model's chat
  template when it has one);
- ``hf:NAME[:CONFIG][:SPLIT]`` through the optional `datasets` package (the only source that may reach
  the network).

Image+text datasets (`gemoe_cli.calibration.images`) feed vision-language models through
`gemoe_cli.calibration.multimodal`. Given to a text-only model, their samples with an image are bad samples
(see `gemoe_cli.calibration.bad_samples`) and the others are read as text.

Samples are tokenized, joined with the end-of-sequence token and cut into blocks of `seq_len` tokens.
Blocks are shuffled with the seed and split deterministically; the held-out part is used only to
measure retention.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from gemoe_cli.calibration.bad_samples import BadSamples, SampleError
from gemoe_cli.errors import InvalidInputError

BUILTIN = "builtin"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationData:
    """Token blocks for fitting and for held-out measurement, and where they came from."""

    source: str
    fit: torch.Tensor  # (N_fit, L)
    heldout: torch.Tensor  # (N_heldout, L)
    samples_read: int
    tokens_available: int
    bad_samples: dict | None = None

    @property
    def fit_count(self) -> int:
        return int(self.fit.size(0))

    @property
    def heldout_count(self) -> int:
        return int(self.heldout.size(0))

    def batches(self, part: str, batch_size: int) -> list[torch.Tensor]:
        blocks = self.fit if part == "fit" else self.heldout
        return [blocks[i : i + batch_size] for i in range(0, blocks.size(0), batch_size)]


def read_samples(dataset: str, bad_samples: BadSamples | None = None) -> list[str | list[dict]]:
    """Read raw samples: strings, or chat message lists to render later.

    Samples with an image are bad samples for a text-only model: `bad_samples` counts them (when it skips)
    or raises naming the first; without `bad_samples` the first one raises.
    """
    from gemoe_cli.calibration.images import is_image_text_dataset

    bad_samples = bad_samples if bad_samples is not None else BadSamples(skip=False)
    if is_image_text_dataset(dataset):
        return _text_of_image_samples(dataset, bad_samples)
    if dataset == BUILTIN:
        text = resources.files("gemoe_cli.calibration").joinpath("data/builtin.jsonl").read_text("utf-8")
        return _parse_jsonl(text.splitlines(), "the built-in calibration set")
    if dataset.startswith("hf:"):
        return _read_hub_dataset(dataset)

    path = Path(dataset).expanduser()
    if not path.exists():
        raise InvalidInputError(f"dataset {dataset} not found; pass a .txt/.jsonl file, a folder, hf:NAME or builtin.")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise InvalidInputError(f"dataset folder {dataset} has no .txt or .jsonl files.")

    samples: list[str | list[dict]] = []
    for file in files:
        if file.suffix not in (".txt", ".jsonl"):
            raise InvalidInputError(f"dataset {file} has suffix {file.suffix!r}; use .txt or .jsonl.")
        try:
            content = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"cannot read dataset {file}: {error}; check that it is UTF-8 text.") from error
        if file.suffix == ".jsonl":
            samples.extend(_parse_jsonl(content.splitlines(), str(file)))
        else:
            samples.extend(part.strip() for part in content.split("\n\n") if part.strip())
    if not samples:
        raise InvalidInputError(f"dataset {dataset} is empty; give it at least one non-empty sample.")
    return samples


def _text_of_image_samples(dataset: str, bad_samples: BadSamples) -> list[str | list[dict]]:
    from gemoe_cli.calibration.images import read_image_text_samples

    samples: list[str | list[dict]] = []
    for sample in read_image_text_samples(dataset):
        if sample.images:
            error = SampleError(
                "image for a text-only model", "the sample has an image, but the model is text-only (no vision tower)"
            )
            bad_samples.add(sample.origin, error)
            continue
        samples.append([_text_only(message) for message in sample.messages])
    if not samples:
        raise InvalidInputError(
            f"dataset {dataset} has no text-only samples for this text-only model ({bad_samples.total} samples "
            "with images skipped); use a text dataset."
        )
    return samples


def _text_only(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, list):
        content = "".join(item.get("text", "") for item in content if isinstance(item, dict))
    return {**message, "content": content}


def _parse_jsonl(lines: list[str], name: str) -> list[str | list[dict]]:
    samples: list[str | list[dict]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{name} line {number} is not valid JSON: {error.msg}.") from error
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            samples.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            samples.append(_check_messages(record["messages"], name, number))
        else:
            raise InvalidInputError(f"{name} line {number} has no 'text' string or 'messages' list; add one.")
    return samples


def _check_messages(messages: list, name: str, number: int) -> list[dict]:
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            raise InvalidInputError(f"{name} line {number}: each message needs 'role' and 'content'.")
    return messages


def _read_hub_dataset(dataset: str) -> list[str | list[dict]]:
    loaded = load_hub_dataset(dataset)
    if "text" in loaded.column_names:
        return [row for row in loaded["text"] if isinstance(row, str) and row.strip()]
    if "messages" in loaded.column_names:
        return list(loaded["messages"])
    raise InvalidInputError(
        f"{dataset} has no 'text' or 'messages' column (columns: {', '.join(loaded.column_names)})."
    )


def load_hub_dataset(dataset: str):
    """Load ``hf:NAME[:CONFIG][:SPLIT]`` (split ``train`` by default) with the `datasets` package."""
    parts = dataset[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise InvalidInputError(f"dataset {dataset} is invalid; use hf:NAME[:CONFIG][:SPLIT].")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 else None) or None,
        parts[2] if len(parts) > 2 else "train",
    )
    try:
        import datasets
    except ImportError as error:
        raise InvalidInputError("hf: datasets need the `datasets` package; pip install 'gemoe[datasets]'.") from error
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many unrelated types for a missing or unreachable dataset.
        raise InvalidInputError(f"cannot load {dataset}: {str(error).splitlines()[0]}") from error


def render(sample: str | list[dict], tokenizer) -> str:
    """Return a sample as text, applying the tokenizer's chat template to message lists when it has one."""
    if isinstance(sample, str):
        return sample
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(sample, tokenize=False)
        except Exception:  # noqa: BLE001 - templates raise jinja's own exceptions for unsupported roles
            # Some templates reject a system role: fold it into the first user turn and try once more.
            folded = _fold_system_message(sample)
            if folded is not sample:
                return tokenizer.apply_chat_template(folded, tokenize=False)
            raise
    return "\n".join(f"{message['role']}: {message['content']}" for message in sample)


def _fold_system_message(messages: list[dict]) -> list[dict]:
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return messages
    merged = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [merged, *messages[2:]]


def build_calibration_data(
    dataset: str,
    tokenizer,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    heldout_fraction: float,
    max_positions: int | None = None,
    bad_samples: BadSamples | None = None,
) -> CalibrationData:
    """Tokenize, pack and split a dataset into `num_samples` blocks of `seq_len` tokens.

    Raises:
        InvalidInputError: the dataset is empty or unreadable, has fewer tokens than two blocks, or
            `seq_len` is above the model's position limit.
    """
    if seq_len < 2:
        raise InvalidInputError(f"--seq-len {seq_len} is too short; use at least 2 tokens.")
    if max_positions is not None and seq_len > max_positions:
        raise InvalidInputError(
            f"--seq-len {seq_len} is above the model's limit of {max_positions} positions; lower it."
        )
    if num_samples < 2:
        raise InvalidInputError(f"--num-samples {num_samples} is too small; use at least 2 (fit and held-out).")

    samples = read_samples(dataset, bad_samples)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)

    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = num_samples * seq_len
    for index in order:
        stream.extend(tokenizer(render(samples[index], tokenizer), add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if len(stream) >= needed:
            break

    blocks = len(stream) // seq_len
    if blocks < 2:
        raise InvalidInputError(
            f"dataset {dataset} has {len(stream)} tokens, fewer than two blocks of --seq-len {seq_len}; "
            "add data or lower --seq-len."
        )
    blocks = min(blocks, num_samples)
    if blocks < num_samples:
        logger.warning(
            "dataset %s has tokens for %d blocks (%d tokens), fewer than the %d blocks (%d tokens) that "
            "--num-samples %d --seq-len %d request, so calibration uses %d blocks; add data, or lower "
            "--num-samples or --seq-len.",
            dataset, blocks, blocks * seq_len, num_samples, num_samples * seq_len, num_samples, seq_len, blocks,
        )  # fmt: skip
    tensor = torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
    permutation = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    tensor = tensor[permutation]
    heldout = min(max(1, round(blocks * heldout_fraction)), blocks - 1)
    skipped = bad_samples.to_json() if bad_samples is not None and bad_samples.total else None
    return CalibrationData(dataset, tensor[heldout:], tensor[:heldout], len(samples), len(stream), skipped)
