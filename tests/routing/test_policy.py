import math

import pytest
import torch

from gemoe_cli.errors import InvalidInputError
from gemoe_cli.routing.policy import experts_per_token, validate_thresholds


def test_k_counts_crossed_thresholds():
    entropy = torch.tensor([0.1, 0.5, 1.0, 2.0])
    thresholds = torch.tensor([0.3, 0.9, 1.5])

    k = experts_per_token(entropy, thresholds, k_min=1, k_max=4)

    assert k.tolist() == [1, 2, 3, 4]


def test_k_equal_to_threshold_does_not_cross():
    k = experts_per_token(torch.tensor([0.5]), torch.tensor([0.5]), k_min=1, k_max=2)

    assert k.tolist() == [1]


def test_minus_inf_thresholds_give_k_max():
    entropy = torch.tensor([0.0, 1.0, 5.0])

    k = experts_per_token(entropy, torch.full((3,), -math.inf), k_min=1, k_max=4)

    assert k.tolist() == [4, 4, 4]


def test_plus_inf_thresholds_give_k_min():
    k = experts_per_token(torch.tensor([0.0, 9.0]), torch.full((2,), math.inf), k_min=2, k_max=4)

    assert k.tolist() == [2, 2]


def test_nonfinite_entropy_gets_k_max():
    entropy = torch.tensor([float("nan"), float("inf"), -float("inf")])

    k = experts_per_token(entropy, torch.tensor([0.5, 1.0]), k_min=1, k_max=3)

    assert k.tolist() == [3, 3, 3]


def test_k_monotone_in_entropy():
    entropy = torch.linspace(0, 3, 101)

    k = experts_per_token(entropy, torch.tensor([0.2, 0.2, 1.7, 2.9]), k_min=1, k_max=5)

    assert torch.all(k[1:] >= k[:-1])


@pytest.mark.parametrize(
    ("thresholds", "k_min", "k_max", "message"),
    [
        ([1.0, 0.5], 1, 3, r"non-decreasing.*\[1\]=0.5"),
        ([0.5], 3, 2, "k_min=3 is greater than k_max=2"),
        ([0.5], 0, 1, "k_min=0 is invalid"),
        ([0.5, 0.6], 1, 2, "has 2 values but k_max - k_min = 1"),
        ([float("nan")], 1, 2, "NaN"),
    ],
)
def test_invalid_thresholds_rejected(thresholds, k_min, k_max, message):
    with pytest.raises(InvalidInputError, match=message):
        validate_thresholds(thresholds, k_min, k_max)


def test_infinite_thresholds_accepted():
    validate_thresholds([-math.inf, 0.3, math.inf], 1, 4)
