"""Benchmark settings and their defaults, defined once for the library and the `gemoe bench` command.

This module imports neither torch nor transformers, so the CLI can read the defaults before it loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemoe_cli.errors import InvalidInputError

MIN_REPEATS = 5
"""Fewest timed runs per policy and phase; a median of fewer runs moves too much between invocations."""

METRICS = ("nll", "agreement", "kl", "exact_match")
"""Retention metrics; ``exact_match`` (greedy answers) needs image+text data with answers."""


@dataclass(frozen=True)
class BenchSettings:
    """Measurement settings of `run_benchmark`: input shapes, repeats, metric and optional extra runs.

    Constructing one validates every field and raises `InvalidInputError` naming the first invalid one.
    """

    prefill_batch_size: int = 8
    """Prompts per prefill run: one forward pass over token prompts, or image+text prompts one at a time."""
    prompt_len: int = 128
    """Tokens per prompt, for prefill and for the prompt that decoding starts from (token-block data only)."""
    decode_batch_size: int = 1
    """Sequences per decode run: generated together from token prompts, one at a time from image+text prompts."""
    gen_len: int = 32
    """New tokens per generated sequence (greedy, KV cache)."""
    repeats: int = MIN_REPEATS
    """Timed runs per policy and phase."""
    warmup: int = 1
    """Untimed runs per policy and phase before the timed ones."""
    metric: str = "nll"
    """Retention metric: nll, agreement, kl or (image+text data) exact_match."""
    eval_batch_size: int = 8
    """Evaluation blocks per forward pass (image+text samples run one at a time)."""
    profile_moe: bool = False
    """Also time the MoE blocks and the adaptive layers' `route` in extra, synchronised runs."""
    sweep_points: int = 0
    """Points per policy on the retention-versus-sparsity sweep; 0 skips the sweep."""
    seed: int = 0
    """Seed of torch's generator for the whole run."""

    def __post_init__(self) -> None:
        positive = {
            "--prefill-batch-size": self.prefill_batch_size,
            "--decode-batch-size": self.decode_batch_size,
            "--prompt-len": self.prompt_len,
            "--eval-batch-size": self.eval_batch_size,
        }
        for option, value in positive.items():
            if value < 1:
                raise InvalidInputError(f"{option} {value} is invalid; use 1 or more.")
        if self.gen_len < 2:
            # Decode speed is measured between the first and the last new token, so it needs two.
            raise InvalidInputError(f"--gen-len {self.gen_len} is too short; use 2 or more new tokens.")
        if self.repeats < MIN_REPEATS:
            raise InvalidInputError(f"--repeats {self.repeats} is too few; use {MIN_REPEATS} or more timed runs.")
        if self.warmup < 0:
            raise InvalidInputError(f"--warmup {self.warmup} is invalid; use 0 or more.")
        if self.metric not in METRICS:
            raise InvalidInputError(f"--metric {self.metric} is unknown; use {', '.join(METRICS)}.")
        if self.sweep_points == 1 or self.sweep_points < 0:
            raise InvalidInputError(f"--sweep-points {self.sweep_points} is invalid; use 0 (no sweep) or 2 or more.")

    @property
    def tokens_needed(self) -> int:
        """Positions one generated sequence occupies: the prompt plus the new tokens."""
        return self.prompt_len + self.gen_len


DEFAULTS = BenchSettings()
