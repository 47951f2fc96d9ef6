"""Drop and grow of dynamic sparse training on FSDP2 shards, equal to what one process computes on the whole tensors.

Every function takes this rank's rows (flat local indices where it says so) and the shards' process ``group``;
``group=None`` means this process alone (no collective: the single-process and DDP case). Selections go through
:func:`~lightning_sparse.distributed.distributed_topk` (exact radix select, lower global flat index first among
ties), so a layer's traffic is a few histograms whatever its size; every element passed to a collective here is
counted in :data:`~lightning_sparse.distributed.TRAFFIC`. Random scores (SET, MEST ``grow="random"``, random
initial masks) need no collective: every rank draws the whole layer from the shared generator, in slabs, and keeps
its rows (:func:`~lightning_sparse.core.scores.random_rows`): no traffic, memory of its rows plus one 16 MB slab, the
time of the whole layer's draws on every rank, and the generator advances exactly as in one process.

Example::

    >>> import torch
    >>> sharded_grow_around(torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([1]), 1, None).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_sparse.core.criteria import fixed_point_mean, fixed_point_shift, fixed_point_sum, sign_split
from lightning_sparse.core.masks import all_finite, count_true, flat_nonzero
from lightning_sparse.distributed import TRAFFIC, Shard, distributed_topk

_OPS = {"sum": "SUM", "max": "MAX"}


def reduce(tensor: Tensor, group: object, op: str = "sum") -> Tensor:
    """``tensor`` reduced in place over ``group`` (``op``: ``"sum"`` or ``"max"``); unchanged for ``group=None``."""
    if group is None:
        return tensor
    TRAFFIC["elements"] += tensor.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return tensor


def all_finite_everywhere(tensors: Sequence[Tensor], group: object) -> bool:
    """Whether every entry of every rank's ``tensors`` is finite (the same answer on every rank: one collective of
    one number)."""
    bad = torch.tensor([0 if all_finite(list(tensors)) else 1], dtype=torch.int64)
    return int(reduce(bad, group)[0]) == 0


def check_finite_everywhere(values: Tensor, group: object, argument: str = "scores") -> None:
    """Raise the same ``ValueError`` on every rank when any rank's ``values`` hold NaN/inf."""
    bad = int(reduce(torch.tensor([int((~torch.isfinite(values)).sum())], dtype=torch.int64), group)[0])
    if bad:
        raise ValueError(f"{argument} must be finite, got {bad} NaN/inf entries")


def _floats(scores: Tensor) -> Tensor:
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def sharded_keep_highest(scores: Tensor, mask: Tensor, k: int, group: object) -> Tensor:
    """Flat local indices (ascending) of the ``k`` highest ``scores`` among the active positions (``mask``) of all
    ranks: :func:`~lightning_sparse.core.masks.keep_highest_among` on the whole tensor, cut to this rank's rows."""
    check_finite_everywhere(scores[mask], group)
    values = torch.where(mask, _floats(scores), -math.inf)
    return flat_nonzero(distributed_topk([values], k, group)[0])


def sharded_grow_around(scores: Tensor, taken: Tensor, n: int, group: object) -> Tensor:
    """Flat local bool mask of ``taken`` (flat local indices) plus the ``n`` other positions of highest ``scores``
    over all ranks: :func:`~lightning_sparse.core.masks.grow_around` on the whole tensor, cut to this rank's rows."""
    check_finite_everywhere(scores, group)
    values = _floats(scores).reshape(-1).clone()
    values[taken] = -math.inf
    chosen = distributed_topk([values], n, group)[0]
    chosen[taken] = True
    return chosen


def sharded_drop_by_sign(values: Tensor, mask: Tensor, n: int, group: object) -> Tensor:
    """:func:`~lightning_sparse.core.criteria.drop_by_sign` over all ranks' rows: the kept active positions."""
    positive, negative = mask & (values >= 0), mask & (values < 0)
    counts = reduce(torch.tensor([count_true(positive), count_true(negative)], dtype=torch.int64), group)
    n_positive, n_negative = sign_split(n, int(counts[0]), int(counts[1]))
    magnitudes = values.abs()
    kept = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    kept[sharded_keep_highest(magnitudes, positive, int(counts[0]) - n_positive, group)] = True
    kept[sharded_keep_highest(magnitudes, negative, int(counts[1]) - n_negative, group)] = True
    return kept.reshape(values.shape)


def own_rows(whole: Tensor, shard: Shard | None) -> Tensor:
    """This rank's rows of a whole tensor (a copy, so the whole one can be freed); ``whole`` when not sharded."""
    return whole if shard is None else whole[shard.row_offset : shard.row_offset + shard.rows].clone()


def momentum_means(values: Mapping[str, Tensor], sizes: Mapping[str, int], group: object) -> dict[str, float]:
    """Mean of each layer's non-negative ``values`` (this rank's part) over all ranks, exactly: fixed-point sums
    (:func:`~lightning_sparse.core.criteria.fixed_point_sum`) at a scale from the global peak, so the means do
    not depend on the order of the values or how they are split. ``sizes``: each layer's whole element count
    (bounds how many values it has). Two collectives of one and two numbers per layer."""
    names = list(values)
    peaks = torch.tensor([float(values[n].max()) if values[n].numel() else 0.0 for n in names], dtype=torch.float64)
    peaks = reduce(peaks, group, "max")
    shifts = [fixed_point_shift(float(peak), sizes[n]) for peak, n in zip(peaks, names, strict=True)]
    pairs = [[fixed_point_sum(values[n], s), values[n].numel()] for n, s in zip(names, shifts, strict=True)]
    sums = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    sums = reduce(sums, group)
    return {n: fixed_point_mean(int(total), int(count), s) for n, (total, count), s in zip(names, sums, shifts,
                                                                                            strict=True)}
