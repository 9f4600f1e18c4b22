"""Checks on the built-in calibration set in gemoe_cli/calibration/data: format, counts and coverage."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "gemoe_cli" / "calibration" / "data"
DATA_PATH = DATA_DIR / "builtin.jsonl"
README_PATH = DATA_DIR / "README.md"

ALLOWED_KEYS = {"id", "category", "text", "messages", "language"}
ALLOWED_ROLES = {"system", "user", "assistant"}
MIN_SAMPLES = 300
MIN_NON_ENGLISH_LANGUAGES = 10
MIN_TOTAL_CHARACTERS = 200_000

# A row of the README's category table, e.g. "| `prose` | 60 | narrative ... |".
README_CATEGORY_ROW = re.compile(r"^\|\s*`(?P<category>\w+)`\s*\|\s*(?P<count>\d+)\s*\|", re.MULTILINE)
README_TOTAL_CHARACTERS = re.compile(r"contains (?P<total>[\d,]+) characters")


def sample_characters(sample: dict) -> int:
    """Return the length of a sample's text, or the summed length of its message contents."""
    if "text" in sample:
        return len(sample["text"])
    return sum(len(message["content"]) for message in sample["messages"])


@pytest.fixture(scope="module")
def lines() -> list[str]:
    # read_text decodes strictly, so an invalid byte raises UnicodeDecodeError instead of becoming U+FFFD.
    return DATA_PATH.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def samples(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def readme_text() -> str:
    return README_PATH.read_text(encoding="utf-8")


def test_every_line_parses(lines: list[str]) -> None:
    for number, line in enumerate(lines, start=1):
        assert line.strip(), f"line {number} is blank"
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            pytest.fail(f"line {number} is not valid JSON: {error}")
        assert isinstance(sample, dict), f"line {number} is a {type(sample).__name__}, expected a JSON object"


def test_ids_unique(samples: list[dict]) -> None:
    counts = Counter(sample["id"] for sample in samples)
    duplicates = sorted(sample_id for sample_id, n in counts.items() if n > 1)
    assert not duplicates, f"duplicate ids: {duplicates}"


def test_ids_name_their_category(samples: list[dict]) -> None:
    for sample in samples:
        assert re.fullmatch(rf"{re.escape(sample['category'])}-\d{{3}}", sample["id"]), (
            f"id {sample['id']!r} does not have the form '{sample['category']}-NNN'"
        )


def test_samples_have_only_known_fields(samples: list[dict]) -> None:
    for sample in samples:
        unknown = set(sample) - ALLOWED_KEYS
        assert not unknown, f"{sample['id']}: unknown fields {sorted(unknown)}"


def test_exactly_one_of_text_or_messages(samples: list[dict]) -> None:
    for sample in samples:
        has_text = "text" in sample
        has_messages = "messages" in sample
        assert has_text != has_messages, f"{sample['id']}: has_text={has_text}, has_messages={has_messages}"


def test_text_is_nonempty_string(samples: list[dict]) -> None:
    for sample in samples:
        if "text" not in sample:
            continue
        assert isinstance(sample["text"], str), f"{sample['id']}: text is not a string"
        assert sample["text"].strip(), f"{sample['id']}: text is empty"


def test_messages_have_valid_roles_and_content(samples: list[dict]) -> None:
    for sample in samples:
        if "messages" not in sample:
            continue
        messages = sample["messages"]
        assert isinstance(messages, list), f"{sample['id']}: messages is not a list"
        assert messages, f"{sample['id']}: messages is empty"
        for index, message in enumerate(messages):
            where = f"{sample['id']} message {index}"
            assert isinstance(message, dict), f"{where}: not an object"
            assert set(message) == {"role", "content"}, f"{where}: keys {sorted(message)}"
            assert message["role"] in ALLOWED_ROLES, f"{where}: invalid role {message['role']!r}"
            assert isinstance(message["content"], str), f"{where}: content is not a string"
            assert message["content"].strip(), f"{where}: content is empty"


def test_chats_alternate_user_and_assistant(samples: list[dict]) -> None:
    # Some chat templates, such as those of Llama 2 chat and Mistral Instruct v0.1, raise an error unless
    # user and assistant turns alternate after an optional leading system message.
    for sample in samples:
        if "messages" not in sample:
            continue
        roles = [message["role"] for message in sample["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert "system" not in roles, f"{sample['id']}: system message after the first turn"
        assert roles, f"{sample['id']}: no user or assistant turns"
        assert roles[0] == "user", f"{sample['id']}: first turn after the system prompt is {roles[0]!r}"
        for previous, current in pairwise(roles):
            assert previous != current, f"{sample['id']}: two {current!r} turns in a row"


def test_category_counts_match_readme(samples: list[dict], readme_text: str) -> None:
    readme_counts = {match["category"]: int(match["count"]) for match in README_CATEGORY_ROW.finditer(readme_text)}
    assert readme_counts, "README.md has no category table rows like '| `prose` | 60 |'"
    file_counts = dict(Counter(sample["category"] for sample in samples))
    assert file_counts == readme_counts


def test_total_characters_match_readme(samples: list[dict], readme_text: str) -> None:
    match = README_TOTAL_CHARACTERS.search(readme_text)
    assert match, "README.md does not state 'contains N characters'"
    stated = int(match["total"].replace(",", ""))
    assert sum(sample_characters(sample) for sample in samples) == stated


def test_at_least_300_samples(samples: list[dict]) -> None:
    assert len(samples) >= MIN_SAMPLES


def test_non_english_samples_name_language(samples: list[dict]) -> None:
    for sample in samples:
        if sample["category"] == "non_english":
            assert re.fullmatch(r"[a-z]{2}", sample.get("language", "")), (
                f"{sample['id']}: language {sample.get('language')!r} is not an ISO 639-1 code"
            )
        else:
            assert "language" not in sample, f"{sample['id']}: language is only for non_english samples"


def test_non_english_covers_ten_languages(samples: list[dict]) -> None:
    languages = {sample["language"] for sample in samples if sample["category"] == "non_english"}
    assert len(languages) >= MIN_NON_ENGLISH_LANGUAGES, f"only {sorted(languages)}"


def test_total_characters_over_200000(samples: list[dict]) -> None:
    assert sum(sample_characters(sample) for sample in samples) > MIN_TOTAL_CHARACTERS
