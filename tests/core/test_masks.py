import functools
import math

import pytest
import torch

from lightning_sparse.core import masks
from lightning_sparse.core.masks import (
    SAMPLE_STRIDE,
    _sampled_hint,
    all_finite,
    drop_lowest,
    flat_nonzero,
    grow_around,
    grow_highest,
    keep_highest_among,
    topk_mask,
    topk_threshold,
)


@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    """Run a test on the numpy selection path (CPU tensors) and on the torch one (other devices)."""
    if request.param == "torch":
        monkeypatch.setattr(masks, "NUMPY_DEVICES", ())
    return request.param


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


@pytest.mark.parametrize(
    "bracket",
    [None, (-10.0, math.inf), (0.5, math.inf), (0.9, math.inf), (0.99, math.inf), (2.0, math.inf),  # low only
     (0.9, 0.93), (0.91, 0.92), (0.92, 0.92), (0.5, 0.6), (0.95, 2.0), (0.0, 1.0)],  # bands: hits, misses, ties
)
def test_topk_threshold_bracket_never_changes_the_result(bracket, backend):
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(3)).mul(100).round().div(100)  # many ties
    expected = topk_mask(scores, 400)
    mask, kth = topk_threshold(scores, 400, bracket)
    assert torch.equal(mask, expected)
    assert kth == scores[expected].min().item()


def test_topk_threshold_selects_inside_a_band_that_holds_the_kth_value(monkeypatch, backend):
    scores = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    kth = torch.sort(scores, descending=True).values[999].item()
    selected = []

    def recording(values, rank, where=None):
        selected.append(values.numel() if where is None else int(where.sum()))
        return real_kth_smallest(values, rank, where)

    monkeypatch.setattr(masks, "_kth_smallest", recording)
    mask, found = topk_threshold(scores, 1000, (kth - 0.01, kth + 0.01))
    assert found == kth and torch.equal(mask, _stable_topk(scores, 1000))
    assert len(selected) == 1 and selected[0] < 200  # only the band's entries, not all 10 000


real_kth_smallest = masks._kth_smallest


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


def _stable_topk(scores, k):
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return expected


@functools.cache
def _layouts(n):
    generator = torch.Generator().manual_seed(n)
    normal = torch.randn(n, generator=generator)
    ties = normal.mul(4).round()
    mostly_zero = normal.masked_fill(torch.rand(n, generator=generator) < 0.7, 0.0)
    strided_peaks = torch.rand(n, generator=generator)
    strided_peaks[::SAMPLE_STRIDE] += 10  # the sample sees only peaks: its hint is far too high
    return {"normal": normal, "ties": ties, "mostly_zero": mostly_zero, "strided_peaks": strided_peaks}


@pytest.mark.parametrize("layout", ["normal", "ties", "mostly_zero", "strided_peaks"])
@pytest.mark.parametrize("k", [1, 700, 9000, 30000])
def test_topk_on_large_tensors_uses_a_sampled_hint_and_equals_a_stable_sort(layout, k, backend):
    scores = _layouts(1 << 17)[layout]
    assert _sampled_hint(scores, k) is not None  # the sampled path is exercised (n >= MIN_SAMPLED, k <= n / 4)
    assert torch.equal(topk_threshold(scores, k)[0], _stable_topk(scores, k))


def test_all_finite_sees_nan_and_inf_anywhere():
    x = torch.randn(100_000)
    assert all_finite([x, torch.arange(3), torch.empty(0)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77_777] = bad
        assert not all_finite([x, y])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_and_torch_selection_paths_agree_at_rounded_bounds(dtype, monkeypatch):
    # bounds that are not representable in float32 round the same way on both paths
    scores = torch.rand(20_000, generator=torch.Generator().manual_seed(5), dtype=dtype).mul(1000).round().div(1000)
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(masks, "NUMPY_DEVICES", devices)
        results.append([topk_threshold(scores, k, (0.9 + 1e-9, 0.95 - 1e-9)) for k in (1, 999, 1500, 3000)])
    for (mask_np, kth_np), (mask_torch, kth_torch) in zip(*results, strict=True):
        assert torch.equal(mask_np, mask_torch) and kth_np == kth_torch


def _stable_top(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the first k of ``among`` (flat indices) in a stable descending sort of their scores."""
    order = torch.sort(scores.reshape(-1)[among], descending=True, stable=True).indices
    return torch.sort(among[order[:k]]).values


@pytest.mark.parametrize("k", [0, 1, 250, 599, 600])
def test_keep_highest_among_equals_a_stable_sort_of_the_candidates(k, backend):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 5, (40, 50), generator=generator).float()  # many ties
    candidates = torch.sort(torch.randperm(2000, generator=generator)[:600]).values
    kept = keep_highest_among(scores, candidates, k)
    assert torch.equal(kept, _stable_top(scores, candidates, k))


@pytest.mark.parametrize("n", [0, 1, 700, 1400])
def test_grow_around_keeps_the_taken_and_adds_the_best_others_like_a_stable_sort(n, backend):
    generator = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 5, (2000,), generator=generator).float()
    taken = torch.sort(torch.randperm(2000, generator=generator)[:600]).values
    free = torch.ones(2000, dtype=torch.bool)
    free[taken] = False
    expected = torch.zeros(2000, dtype=torch.bool)
    expected[taken] = True
    expected[_stable_top(scores, torch.nonzero(free).squeeze(1), n)] = True
    assert torch.equal(grow_around(scores, taken, n), expected)


def test_grow_around_writes_into_the_scores_only_when_told_to():
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    taken = torch.tensor([0])
    assert grow_around(scores, taken, 1).tolist() == [True, True, False, False]
    assert scores.tolist() == [4.0, 3.0, 2.0, 1.0]
    assert grow_around(scores, taken, 1, overwrite=True).tolist() == [True, True, False, False]
    assert scores[0] == -math.inf  # the caller's own scores, used as the work buffer


def test_grow_around_and_keep_highest_among_reject_bad_counts_and_nan():
    with pytest.raises(ValueError, match=r"n must be in \[0, 1\] \(the inactive count\), got 2"):
        grow_around(torch.zeros(3), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"k must be in \[0, 2\] \(the candidate count\), got 3"):
        keep_highest_among(torch.zeros(3), torch.tensor([0, 2]), 3)
    with pytest.raises(ValueError, match="must be finite"):
        grow_around(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="must be finite"):
        keep_highest_among(torch.tensor([float("inf"), 0.0]), torch.tensor([0, 1]), 1)


def test_keep_highest_among_reads_only_the_candidates_scores():
    scores = torch.tensor([float("nan"), 2.0, 1.0, float("inf")])
    assert keep_highest_among(scores, torch.tensor([1, 2]), 1).tolist() == [1]


def test_flat_nonzero_gives_ascending_flat_indices_of_any_layout(backend):
    mask = (torch.arange(24).reshape(4, 6) % 5 == 0).t()  # a transposed view
    assert torch.equal(flat_nonzero(mask), torch.nonzero(mask.reshape(-1)).squeeze(1))
    assert flat_nonzero(mask).dtype == torch.int64
    assert flat_nonzero(torch.zeros(3, dtype=torch.bool)).numel() == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_grow_around_keeps_float64_scores_apart_that_float32_would_tie(overwrite):
    scores = torch.tensor([0.0, 1.0, 1.0 + 1e-12], dtype=torch.float64)  # equal once rounded to float32
    assert grow_around(scores, torch.tensor([0]), 1, overwrite=overwrite).tolist() == [True, False, True]
