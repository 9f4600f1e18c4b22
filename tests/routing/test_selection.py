import torch

from gemoe_cli.routing.selection import rank_slots, truncate_selection

SENTINEL = 8


def test_rank_slots_descending_and_stable_on_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9]])

    assert rank_slots(scores).tolist() == [[3, 0, 2, 1]]


def test_rank_slots_nan_last():
    scores = torch.tensor([[float("nan"), 0.2, 0.3]])

    assert rank_slots(scores).tolist() == [[2, 1, 0]]


def test_truncate_keeps_best_scored_slots_of_unsorted_selection():
    index = torch.tensor([[5, 2, 7, 1]])
    weights = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])

    new_index, new_weights = truncate_selection(index, weights, scores, torch.tensor([2]), "none", SENTINEL)

    assert new_index.tolist() == [[SENTINEL, 2, SENTINEL, 1]]
    assert torch.allclose(new_weights, torch.tensor([[0.0, 0.4, 0.0, 0.3]]))


def test_preserve_mass_rescales_to_original_sum():
    index = torch.tensor([[0, 1, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2]]) * 2.5  # un-normalised router, sum 2.5

    _, new_weights = truncate_selection(index, weights, weights, torch.tensor([2]), "preserve_mass", SENTINEL)

    assert torch.allclose(new_weights, torch.tensor([[1.5625, 0.9375, 0.0]]))
    assert torch.allclose(new_weights.sum(), torch.tensor(2.5))


def test_selection_score_not_weight_decides():
    # A selection bias can rank a low-weight expert first; it must be the one kept.
    index = torch.tensor([[3, 4]])
    weights = torch.tensor([[0.8, 0.2]])
    scores = torch.tensor([[0.8, 1.2]])

    new_index, new_weights = truncate_selection(index, weights, scores, torch.tensor([1]), "preserve_mass", SENTINEL)

    assert new_index.tolist() == [[SENTINEL, 4]]
    assert torch.allclose(new_weights, torch.tensor([[0.0, 1.0]]))


def test_full_k_is_bitwise_unchanged():
    index = torch.tensor([[1, 0], [3, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)

    new_index, new_weights = truncate_selection(index, weights, weights, torch.tensor([2, 2]), "preserve_mass", 4)

    assert torch.equal(new_index, index)
    assert torch.equal(new_weights, weights)


def test_zero_kept_mass_gives_no_nan():
    index = torch.tensor([[0, 1]])
    weights = torch.tensor([[0.0, 0.0]])

    _, new_weights = truncate_selection(index, weights, weights, torch.tensor([1]), "preserve_mass", 2)

    assert torch.isfinite(new_weights).all()


def test_dropped_slots_can_use_valid_fallback_index():
    index = torch.tensor([[5, 6]])
    weights = torch.tensor([[0.6, 0.4]])
    fallback = torch.tensor([[5, 5]])

    new_index, new_weights = truncate_selection(index, weights, weights, torch.tensor([1]), "none", fallback)

    assert new_index.tolist() == [[5, 5]]
    assert new_weights.tolist()[0][1] == 0.0
