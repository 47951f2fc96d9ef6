"""The sharded drop/grow helpers in one process (no collective) equal the single-process mask functions; the
fixed-point means do not depend on how the values are split."""

import math

import pytest
import torch

from lightning_sparse.core.criteria import (
    drop_by_sign,
    fixed_point_mean,
    fixed_point_shift,
    fixed_point_sum,
    sign_split,
)
from lightning_sparse.core.masks import flat_nonzero, grow_around, keep_highest_among
from lightning_sparse.distributed import TRAFFIC
from lightning_sparse.distributed_dst import (
    all_finite_everywhere,
    check_finite_everywhere,
    momentum_means,
    own_rows,
    reduce,
    sharded_drop_by_sign,
    sharded_grow_around,
    sharded_keep_highest,
)


def _cases(seed=0, count=40):
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        n = int(torch.randint(2, 200, (1,), generator=generator))
        if i % 2:  # few distinct values: many ties, signed zeros
            values = torch.randint(-2, 3, (n,), generator=generator).float() * (1 - 2 * (i % 4 == 1))
        else:
            values = torch.randn(n, generator=generator)
        mask = torch.rand(n, generator=generator) < 0.5
        yield values, mask, generator


def test_keep_grow_and_sign_drop_equal_the_single_process_functions():
    for values, mask, generator in _cases():
        active = flat_nonzero(mask)
        k = int(torch.randint(0, active.numel() + 1, (1,), generator=generator))
        assert torch.equal(sharded_keep_highest(values, mask, k, None), keep_highest_among(values, active, k))
        free = values.numel() - active.numel()
        n = int(torch.randint(0, free + 1, (1,), generator=generator))
        assert torch.equal(sharded_grow_around(values, active, n, None), grow_around(values, active, n))
        drops = int(torch.randint(0, active.numel() + 1, (1,), generator=generator))
        assert torch.equal(sharded_drop_by_sign(values, mask, drops, None), drop_by_sign(values, mask, drops))


def test_sign_split_takes_the_rest_from_the_other_sign_and_refuses_too_many():
    assert sign_split(5, 10, 10) == (3, 2)
    assert sign_split(5, 10, 1) == (4, 1)
    assert sign_split(5, 1, 10) == (1, 4)
    with pytest.raises(ValueError, match=r"n must be in \[0, 3\] \(the active count\), got 4"):
        sign_split(4, 1, 2)


def test_non_finite_scores_are_refused_with_their_count():
    assert all_finite_everywhere([torch.ones(3)], None)
    assert not all_finite_everywhere([torch.tensor([1.0, math.inf])], None)
    with pytest.raises(ValueError, match=r"scores must be finite, got 2 NaN/inf entries"):
        check_finite_everywhere(torch.tensor([1.0, math.nan, -math.inf]), None)
    with pytest.raises(ValueError, match=r"scores must be finite, got 1 NaN/inf entries"):
        sharded_grow_around(torch.tensor([1.0, math.nan]), torch.tensor([0]), 1, None)


def test_fixed_point_sums_do_not_depend_on_order_or_split():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(10_000, generator=generator) * torch.logspace(-6, 2, 10_000)
    shift = fixed_point_shift(float(values.max()), values.numel())
    whole = fixed_point_sum(values, shift)
    pieces = sum(fixed_point_sum(piece, shift) for piece in torch.split(values[torch.randperm(10_000)], 777))
    assert whole == pieces
    mean = fixed_point_mean(whole, values.numel(), shift)
    assert mean == pytest.approx(float(values.double().mean()), rel=1e-12)


def test_fixed_point_shift_cannot_overflow_int64():
    for peak in (1e-30, 0.37, 1.0, 3e5, 1e30):
        for count in (1, 1000, 2**31):
            shift = fixed_point_shift(peak, count)
            assert math.floor(peak * 2.0**shift) * count < 2**63
            assert math.floor(peak * 2.0**shift) >= 2 ** (61 - count.bit_length())
    assert fixed_point_shift(0.0, 10) == 0 and fixed_point_mean(0, 0, 5) == 0.0


def test_momentum_means_of_one_process_and_empty_layers():
    values = {"a": torch.tensor([0.5, 0.25]), "empty": torch.zeros(0)}
    assert momentum_means(values, {"a": 4, "empty": 4}, None) == {"a": 0.375, "empty": 0.0}


def test_no_group_means_no_collective_and_no_traffic():
    before, tensor = TRAFFIC["elements"], torch.ones(3)
    assert reduce(tensor, None) is tensor and TRAFFIC["elements"] == before
    whole = torch.arange(6).reshape(3, 2)
    assert own_rows(whole, None) is whole
