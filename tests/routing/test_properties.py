"""Property-based tests of the routing core over random, flat, tied and non-finite router scores."""

import math

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores
from gemoe_cli.routing.policy import experts_per_token
from gemoe_cli.routing.selection import rank_slots, truncate_selection

SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e4, -1e4, math.inf, -math.inf, math.nan])
FINITE = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, allow_infinity=False)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SCORINGS = st.sampled_from(["softmax", "sigmoid"])


@st.composite
def routing_case(draw):
    num_experts = draw(st.integers(min_value=2, max_value=256))
    top_k = draw(st.integers(min_value=1, max_value=min(16, num_experts)))
    tokens = draw(st.integers(min_value=1, max_value=6))
    kind = draw(st.sampled_from(["random", "flat", "tied", "negative", "special"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(tokens, num_experts, generator=generator) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    if kind == "flat":
        logits = torch.full_like(logits, draw(FINITE))
    elif kind == "tied":
        logits = torch.round(logits)
    elif kind == "negative":
        logits = -logits.abs() - 5.0
    elif kind == "special":
        for _ in range(draw(st.integers(1, 4))):
            row = draw(st.integers(0, tokens - 1))
            column = draw(st.integers(0, num_experts - 1))
            logits[row, column] = draw(SPECIAL)
    logits = logits.to(draw(DTYPES))

    k_min = draw(st.integers(min_value=1, max_value=top_k))
    k_max = draw(st.integers(min_value=k_min, max_value=top_k))
    thresholds = sorted(
        draw(
            st.lists(
                st.one_of(FINITE, st.just(math.inf), st.just(-math.inf)), min_size=k_max - k_min, max_size=k_max - k_min
            )
        )
    )
    return logits, top_k, k_min, k_max, thresholds, draw(SCORINGS)


def _route(logits, top_k, k_min, k_max, thresholds, scoring, renormalize):
    distribution = gating_distribution(logits, scoring)
    entropy = gating_entropy(distribution)
    nonfinite = ~torch.isfinite(logits.float()).all(dim=-1)
    entropy = torch.where(nonfinite, torch.full_like(entropy, math.nan), entropy)
    k = experts_per_token(entropy, torch.tensor(thresholds, dtype=torch.float32), k_min, k_max)

    weights_all = torch.nan_to_num(distribution, nan=0.0)
    top_k_weights, top_k_index = torch.topk(weights_all, top_k, dim=-1)
    top_k_weights = top_k_weights / top_k_weights.sum(-1, keepdim=True).clamp_min(1e-30)
    slot_scores = selection_scores(logits, scoring, None).gather(-1, top_k_index)
    index, weights = truncate_selection(top_k_index, top_k_weights, slot_scores, k, renormalize, logits.size(-1))
    return entropy, k, nonfinite, top_k_weights, index, weights


@seed(20261204)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_case(), st.sampled_from(["preserve_mass", "none"]))
def test_routing_invariants(case, renormalize):
    logits, top_k, k_min, k_max, thresholds, scoring = case
    num_experts = logits.size(-1)

    entropy, k, nonfinite, top_k_weights, index, weights = _route(
        logits, top_k, k_min, k_max, thresholds, scoring, renormalize
    )

    assert torch.all((k >= k_min) & (k <= k_max))
    assert torch.all(k[nonfinite] == k_max)
    finite_entropy = entropy[torch.isfinite(entropy)]
    assert torch.all(finite_entropy >= -1e-4)
    assert torch.all(finite_entropy <= math.log(num_experts) + 1e-3)
    assert torch.isfinite(weights).all()
    assert torch.all(weights >= 0)
    kept = index < num_experts
    assert torch.equal(kept.sum(-1), k)
    assert torch.all(weights[~kept] == 0)
    if renormalize == "preserve_mass":
        has_mass = weights.sum(-1) > 0
        assert torch.allclose(weights.sum(-1)[has_mass], top_k_weights.sum(-1)[has_mass], rtol=1e-3, atol=1e-5)


@seed(20261204)
@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 6, allow_nan=False), min_size=2, max_size=50),
    st.lists(st.floats(-1, 7, allow_nan=False), min_size=0, max_size=8),
    st.integers(1, 4),
)
def test_k_monotone_in_entropy(entropies, thresholds, k_min):
    thresholds = sorted(thresholds)
    entropy = torch.tensor(sorted(entropies))

    k = experts_per_token(entropy, torch.tensor(thresholds), k_min, k_min + len(thresholds))

    assert torch.all(k[1:] >= k[:-1])


@seed(20261204)
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_rank_slots_is_a_permutation(top_k, random_seed):
    generator = torch.Generator().manual_seed(random_seed)
    scores = torch.round(torch.randn(4, top_k, generator=generator))
    scores[0, 0] = math.nan

    ranks = rank_slots(scores)

    assert torch.equal(ranks.sort(-1).values, torch.arange(top_k).expand(4, top_k))
