import math

import pytest
import torch

from gemoe_cli.routing.gating import gating_distribution, gating_entropy, selection_scores


def test_softmax_distribution_matches_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])

    distribution = gating_distribution(logits, "softmax")

    assert torch.allclose(distribution, torch.tensor([[0.25, 0.75]]))


def test_sigmoid_distribution_is_normalised_sigmoid():
    logits = torch.tensor([[0.0, 0.0, math.log(3.0)]])  # sigmoid -> 0.5, 0.5, 0.75

    distribution = gating_distribution(logits, "sigmoid")

    assert torch.allclose(distribution, torch.tensor([[0.5, 0.5, 0.75]]) / 1.75)


def test_probabilities_pass_through():
    probabilities = torch.tensor([[0.1, 0.9]])

    assert torch.equal(gating_distribution(probabilities, "probabilities"), probabilities)


def test_unknown_scoring_raises():
    with pytest.raises(ValueError, match="unknown scoring 'tanh'"):
        gating_distribution(torch.zeros(1, 2), "tanh")


def test_entropy_uniform_is_log_e():
    for num_experts in (2, 8, 64, 256):
        uniform = torch.full((1, num_experts), 1.0 / num_experts)
        assert gating_entropy(uniform).item() == pytest.approx(math.log(num_experts), rel=1e-6)


def test_entropy_one_hot_is_zero():
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])

    assert gating_entropy(one_hot).item() == 0.0


def test_entropy_hand_value():
    distribution = torch.tensor([[0.25, 0.75]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))

    assert gating_entropy(distribution).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_bounded_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])

    entropy = gating_entropy(gating_distribution(logits, "softmax"))

    assert torch.all(entropy >= 0)
    assert torch.all(entropy <= math.log(3) + 1e-6)
    assert entropy[1].item() == pytest.approx(math.log(3), rel=1e-6)


def test_entropy_nonfinite_logits_are_not_finite():
    logits = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0]])

    entropy = gating_entropy(gating_distribution(logits, "softmax"))

    assert not torch.isfinite(entropy).any()


def test_selection_bias_reorders_but_not_distribution():
    logits = torch.tensor([[2.0, 1.0]])
    bias = torch.tensor([0.0, 1.0])

    scores = selection_scores(logits, "sigmoid", bias)

    assert scores[0, 1] > scores[0, 0]
    assert torch.allclose(gating_distribution(logits, "sigmoid"), gating_distribution(logits, "sigmoid"))
    assert gating_distribution(logits, "sigmoid")[0, 0] > 0.5


def test_softmax_selection_adds_bias_to_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    bias = torch.tensor([0.6, 0.0])

    scores = selection_scores(logits, "softmax", bias)

    assert torch.allclose(scores, torch.tensor([[0.85, 0.75]]))
