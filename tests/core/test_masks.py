import pytest
import torch

from lightning_sparse.core.masks import drop_lowest, grow_highest, topk_mask, topk_threshold


def test_topk_exact_count_and_tie_break_by_index():
    scores = torch.zeros(10)
    assert topk_mask(scores, 3).tolist() == [True] * 3 + [False] * 7


def test_topk_matches_sort_on_distinct_scores():
    scores = torch.randn(1000)
    mask = topk_mask(scores, 100)
    assert mask.sum() == 100
    assert scores[mask].min() > scores[~mask].max()


def test_topk_rejects_bad_k_and_nan():
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\], got 5"):
        topk_mask(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="must be finite"):
        topk_mask(torch.tensor([1.0, float("nan")]), 1)


def test_drop_and_grow_keep_counts():
    mask = torch.tensor([True, True, True, False, False, False])
    scores = torch.tensor([3.0, 1.0, 2.0, 9.0, 8.0, 7.0])
    dropped = drop_lowest(scores, mask, 2)
    assert dropped.tolist() == [True, False, False, False, False, False]  # inactive 9, 8, 7 never count
    grown = grow_highest(scores, dropped, 2)
    assert grown.tolist() == [True, False, False, True, True, False]


def test_grow_only_among_inactive_even_when_scores_tie_at_zero():
    mask = torch.tensor([True, False, False, False])
    grown = grow_highest(torch.zeros(4), mask, 3)
    assert grown.all()


def test_drop_and_grow_reject_impossible_counts():
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match="active count"):
        drop_lowest(torch.zeros(2), mask, 2)
    with pytest.raises(ValueError, match="inactive count"):
        grow_highest(torch.zeros(2), mask, 2)


@pytest.mark.parametrize("k", [0, 1, 37, 500, 999, 1000])
def test_topk_equals_the_first_k_of_a_stable_descending_sort_with_many_ties(k):
    scores = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(k)).float()
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(topk_mask(scores, k), expected)


def test_drop_and_grow_on_a_non_contiguous_mask_and_tied_scores():
    mask = (torch.arange(24).reshape(4, 6) % 3 == 0).t()  # a transposed view
    scores = torch.ones(6, 4)
    dropped = drop_lowest(scores, mask, 3)
    assert dropped.sum() == int(mask.sum()) - 3
    kept_order = torch.nonzero(mask.reshape(-1)).squeeze(1)
    assert torch.equal(torch.nonzero(dropped.reshape(-1)).squeeze(1), kept_order[:-3])  # ties: higher indices go
    grown = grow_highest(scores, dropped, 5)
    new = torch.nonzero((grown & ~dropped).reshape(-1)).squeeze(1)
    assert torch.equal(new, torch.nonzero(~dropped.reshape(-1)).squeeze(1)[:5])  # ties: lower indices grow


@pytest.mark.parametrize("below", [None, -10.0, 0.5, 0.9, 0.99, 2.0])  # all, too many, in range, too few
def test_topk_threshold_hint_never_changes_the_result(below):
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(3)).mul(100).round().div(100)  # many ties
    expected = topk_mask(scores, 400)
    mask, kth = topk_threshold(scores, 400, below)
    assert torch.equal(mask, expected)
    assert kth == scores[expected].min().item()


def test_topk_threshold_of_zero_and_all():
    scores = torch.tensor([3.0, 1.0, 2.0])
    mask, kth = topk_threshold(scores, 0)
    assert not mask.any() and kth == float("-inf")
    mask, kth = topk_threshold(scores, 3)
    assert mask.all() and kth == 1.0


def test_topk_threshold_rejects_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\], got 4"):
        topk_threshold(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\], got -1"):
        topk_threshold(torch.zeros(3), -1)
