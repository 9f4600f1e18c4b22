"""Per-sample errors of calibration data: stop at the first one, or skip and count them.

Without `--skip-bad-samples`, the first bad sample stops the run before the model loads, with the sample's
origin (file and line number, image path, or dataset row). With it, bad samples are left out and counted by
kind; the counts and the first few messages go into the report.
"""

from __future__ import annotations

from collections import Counter

from gemoe_cli.errors import InvalidInputError

MAX_LISTED = 20
"""Bad samples whose messages the report lists; all of them are counted."""


class SampleError(Exception):
    """One sample cannot be used. `kind` groups errors for the counts (for example ``missing image``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class BadSamples:
    """Collects the bad samples of one run, or raises at the first when skipping is off."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.messages: list[str] = []

    def add(self, origin: str, error: SampleError) -> None:
        """Record a bad sample, or raise `InvalidInputError` naming it when skipping is off."""
        if not self.skip:
            raise InvalidInputError(f"{origin}: {error}; fix the sample, or pass --skip-bad-samples to leave it out.")
        self.counts[error.kind] += 1
        if len(self.messages) < MAX_LISTED:
            self.messages.append(f"{origin}: {error}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"skipped": self.total, "by_kind": dict(sorted(self.counts.items())), "first": self.messages}
