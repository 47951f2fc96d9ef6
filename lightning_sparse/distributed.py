"""Masks of FSDP2-sharded parameters: where a rank's shard sits, and exact top-k across shards.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter is a
``DTensor`` sharded on dim 0: each rank holds a contiguous block of rows. A mask lives beside its local shard (same
rows, a plain bool tensor) and every selection is computed exactly as one process would compute it on the full
tensor, through collectives whose size does not depend on the layer's size:

* :func:`distributed_topk`: the k highest scores over the shards of one or several tensors, by a radix select on the
  scores' bit patterns (one all-reduced 256-bin histogram per byte: 4 rounds for float32 scores), then the ties at
  the k-th value handed out in global flat order (the single-process tie-break: lower flat index first), from one
  all-gathered count of ties per rank and tensor. :data:`TRAFFIC` counts the elements each call passes to
  collectives.

Example::

    >>> import torch
    >>> [m.tolist() for m in distributed_topk([torch.tensor([1.0, 3.0, 3.0, 2.0])], 2)]
    [[False, True, True, False]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

TRAFFIC = {"elements": 0}
"""Elements passed to collectives by :func:`distributed_topk` since the process started (tests read it)."""


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 or tensor-parallel parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view: in-place edits reach the parameter), else ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class Shard:
    """The rows of a dim-0-sharded parameter that this rank holds."""

    global_shape: tuple[int, ...]
    row_offset: int
    rows: int
    group: object

    @property
    def row_size(self) -> int:
        size = 1
        for dim in self.global_shape[1:]:
            size *= dim
        return size


def shard_of(param: Tensor, name: str) -> Shard | None:
    """Where this rank's rows of ``param`` sit, or ``None`` for a plain tensor.

    Raises:
        ValueError: for a ``DTensor`` not sharded on dim 0 alone (tensor parallel, 2-D sharding), naming ``name``
            and its placements.
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as ShardPlacement
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)
    sharded = [i for i, p in enumerate(placements) if isinstance(p, ShardPlacement)]
    if len(sharded) != 1 or placements[sharded[0]].dim != 0 or not all(
        isinstance(p, Replicate) for i, p in enumerate(placements) if i != sharded[0]
    ):
        raise ValueError(
            f"{name} is a DTensor with placements {placements}; lightning_sparse supports parameters sharded on dim 0 "
            "over one mesh dimension (FSDP2's fully_shard under ModelParallelStrategy with tensor_parallel_size=1)"
        )
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    group = param.device_mesh.get_group(sharded[0])
    return Shard(tuple(param.shape), int(offset[0]), int(local_shape[0]), group)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor, group: object) -> Tensor:
    """``tensor`` summed over the ranks of ``group`` (a copy; unchanged without a process group)."""
    tensor = tensor.clone()
    if _initialized():
        dist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_max(tensor: Tensor, group: object) -> Tensor:
    """``tensor``'s elementwise maximum over the ranks of ``group`` (a copy; unchanged without a process group)."""
    tensor = tensor.clone()
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def rows_of(whole: Tensor, shard: Shard | None) -> Tensor:
    """This rank's rows of a whole tensor laid out like the sharded parameter (``whole`` itself for ``None``)."""
    return whole if shard is None else whole[shard.row_offset : shard.row_offset + shard.rows]


def whole_of(rows: Tensor, shard: Shard | None) -> Tensor:
    """The whole tensor from this rank's ``rows`` (:func:`gather_rows`; ``rows`` itself for ``None``)."""
    return rows if shard is None else gather_rows(rows, shard)


def group_shard(shard: Shard | None, rows_per_group: int, global_rows: int) -> Shard | None:
    """The shard of a tensor of ``global_rows`` rows with one row per ``rows_per_group`` rows of ``shard``'s
    parameter (a block grid, Supermask's tile scores): its rows sit where the parameter's do.

    Raises:
        ValueError: when ``shard``'s rows do not start and end on a group boundary.
    """
    if shard is None:
        return None
    end = shard.row_offset + shard.rows
    if shard.row_offset % rows_per_group or (end % rows_per_group and end != shard.global_shape[0]):
        raise ValueError(f"this rank holds rows {shard.row_offset} to {end} of {shard.global_shape}, which splits "
                         f"its groups of {rows_per_group} rows")
    start = shard.row_offset // rows_per_group
    return Shard((global_rows,), start, -(-end // rows_per_group) - start, shard.group)


def gather_rows(rows: Tensor, shard: Shard) -> Tensor:
    """The whole tensor from every rank's rows of it (padded to equal sizes for the collective)."""
    if not _initialized():
        return rows
    world, rank = dist.get_world_size(shard.group), dist.get_rank(shard.group)
    most = -(-shard.global_shape[0] // world)
    if rows.shape[0] and shard.row_offset != rank * most:
        raise ValueError(f"rank {rank} holds rows from {shard.row_offset} of {shard.global_shape[0]}; expected "
                         f"{rank * most} (FSDP2's even chunks on dim 0)")
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    if padded.dtype == torch.bool:
        padded = padded.view(torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=shard.group)
    whole = torch.cat(parts)[: shard.global_shape[0]]
    return whole.view(torch.bool) if rows.dtype == torch.bool else whole


def _keys(scores: Tensor) -> Tensor:
    """Integer keys (int32 for float32 scores, int64 for float64) with the order of the float scores (IEEE bit
    patterns, negatives flipped; ``-0.0`` made ``+0.0``
    first, since the two compare equal)."""
    scores = scores + 0.0
    if scores.dtype == torch.float64:
        bits = scores.contiguous().view(torch.int64)
        return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
    bits = scores.float().contiguous().view(torch.int32)  # 4 bytes per key: selection needs no more memory
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _all_reduce(tensor: Tensor, group: object) -> Tensor:
    TRAFFIC["elements"] += tensor.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor


def _kth_key(keys: Sequence[Tensor], k: int, nbytes: int, group: object) -> tuple[int, int]:
    """The k-th highest key over every rank's keys, and how many keys are strictly above it."""
    prefix, above = 0, 0  # prefix: the bytes fixed so far, as a signed value shifted down
    for round_ in range(nbytes):
        shift = 8 * (nbytes - 1 - round_)
        histogram = torch.zeros(256, dtype=torch.int64)
        for key in keys:
            candidates = key if round_ == 0 else key[(key >> (shift + 8)) == prefix]
            digits = (candidates >> shift) & 0xFF if round_ else (candidates >> shift) + 128
            histogram += torch.bincount(digits, minlength=256).cpu()
        _all_reduce(histogram, group)
        from_top = histogram.flip(0).cumsum(0)
        bin_from_top = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        digit = 255 - bin_from_top
        above += int(from_top[bin_from_top - 1]) if bin_from_top else 0
        prefix = digit - 128 if round_ == 0 else (prefix << 8) | digit
    return prefix, above


def _ties_before(ties: Tensor, group: object) -> Tensor:
    """``ties`` (one count per tensor) of every rank, as a ``(world, tensors)`` matrix."""
    if not _initialized():
        TRAFFIC["elements"] += ties.numel()
        return ties.unsqueeze(0)
    world = dist.get_world_size(group)
    gathered = [torch.zeros_like(ties) for _ in range(world)]
    TRAFFIC["elements"] += ties.numel() * world
    dist.all_gather(gathered, ties, group=group)
    return torch.stack(gathered)


def distributed_topk(scores: Sequence[Tensor], k: int, group: object = None) -> list[Tensor]:
    """Masks of the ``k`` highest scores over every rank's ``scores`` (local shards of one or several tensors).

    The result equals a single process's :func:`~lightning_sparse.core.masks.topk_flat` on the concatenation, in
    order, of the full tensors (each the concatenation of its shards in rank order): ties at the k-th value go to the
    lowest global flat indices. Every rank must call it with the same number of tensors and the same ``k``.

    Raises:
        ValueError: when ``k`` is outside ``[0, total size]``.
    """
    sizes = torch.tensor([s.numel() for s in scores], dtype=torch.int64)
    total = int(_all_reduce(sizes.sum().reshape(1), group))
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0 or k == total:
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in scores]
    keys = [_keys(s.detach().reshape(-1)) for s in scores]
    nbytes = 8 if any(s.dtype == torch.float64 for s in scores) else 4
    if nbytes == 8:
        keys = [_keys(s.detach().reshape(-1).double()) for s in scores]
    kth, above = _kth_key(keys, k, nbytes, group)
    ties = torch.tensor([int((key == kth).sum()) for key in keys], dtype=torch.int64)
    counts = _ties_before(ties, group)  # (world, tensors)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    need = k - above
    # global order of ties: tensor by tensor, and within a tensor rank by rank
    order = counts.T.reshape(-1)
    before = order.cumsum(0) - order  # ties ahead of (tensor, rank)
    world = counts.shape[0]
    masks = []
    for i, (key, score) in enumerate(zip(keys, scores, strict=True)):
        ahead = int(before[i * world + rank])
        quota = max(0, min(int(ties[i]), need - ahead))
        mask = key > kth
        if quota:
            tied = torch.nonzero(key == kth).flatten()[:quota]
            mask[tied] = True
        masks.append(mask.reshape(score.shape))
    return masks


def _digit_step(histogram: Tensor, k: int, above: int, prefix: int, round_: int) -> tuple[int, int]:
    """One radix round of a selection: the next byte of the k-th key (as the new prefix) and the keys above it."""
    from_top = histogram.flip(0).cumsum(0)
    bin_from_top = int(torch.searchsorted(from_top, torch.tensor(k - above)))
    digit = 255 - bin_from_top
    above += int(from_top[bin_from_top - 1]) if bin_from_top else 0
    return (digit - 128 if round_ == 0 else (prefix << 8) | digit), above


def distributed_topk_each(scores: Sequence[Tensor], ks: Sequence[int], group: object = None) -> list[Tensor]:
    """:func:`distributed_topk` of each tensor on its own (its ``ks[i]`` highest scores over every rank's shard of
    it), all selections in the same collectives: one size all-reduce, one ``(tensors, 256)`` histogram all-reduce per
    radix round and one tie-count all-gather, whatever the number of tensors. Each mask equals one process's
    :func:`~lightning_sparse.core.masks.topk_flat` on the whole tensor (ties to the lowest flat indices).

    Raises:
        ValueError: when ``ks`` and ``scores`` differ in length, or a ``k`` is outside ``[0, its tensor's size]``.
    """
    if len(ks) != len(scores):
        raise ValueError(f"ks must give one k per tensor: {len(scores)} tensors, got {len(ks)} ks")
    totals = _all_reduce(torch.tensor([s.numel() for s in scores], dtype=torch.int64), group).tolist()
    for k, total in zip(ks, totals, strict=True):
        if not 0 <= k <= total:
            raise ValueError(f"k must be in [0, {total}], got {k}")
    nbytes = 8 if any(s.dtype == torch.float64 for s in scores) else 4
    keys = [_keys(s.detach().reshape(-1).double() if nbytes == 8 else s.detach().reshape(-1)) for s in scores]
    chosen = [0 < k < total for k, total in zip(ks, totals, strict=True)]
    prefixes, above = [0] * len(keys), [0] * len(keys)
    for round_ in range(nbytes):
        shift = 8 * (nbytes - 1 - round_)
        histograms = torch.zeros(len(keys), 256, dtype=torch.int64)
        for i, key in enumerate(keys):
            if chosen[i]:
                candidates = key if round_ == 0 else key[(key >> (shift + 8)) == prefixes[i]]
                digits = (candidates >> shift) & 0xFF if round_ else (candidates >> shift) + 128
                histograms[i] = torch.bincount(digits, minlength=256).cpu()
        _all_reduce(histograms, group)
        for i in (i for i in range(len(keys)) if chosen[i]):
            prefixes[i], above[i] = _digit_step(histograms[i], ks[i], above[i], prefixes[i], round_)
    ties = torch.tensor([int((key == kth).sum()) if c else 0 for key, kth, c in zip(keys, prefixes, chosen,
                                                                                   strict=True)], dtype=torch.int64)
    counts = _ties_before(ties, group)  # (world, tensors)
    rank = dist.get_rank(group) if _initialized() else 0
    masks = []
    for i, (key, score) in enumerate(zip(keys, scores, strict=True)):
        if not chosen[i]:
            masks.append(torch.full(score.shape, ks[i] > 0, dtype=torch.bool, device=score.device))
            continue
        quota = max(0, min(int(ties[i]), ks[i] - above[i] - int(counts[:rank, i].sum())))
        mask = key > prefixes[i]
        if quota:
            mask[torch.nonzero(key == prefixes[i]).flatten()[:quota]] = True
        masks.append(mask.reshape(score.shape))
    return masks


def check_shard(pattern: object, name: str, shard: Shard | None, transposed: bool = False) -> None:
    """Refuse a block or N:M pattern whose groups would straddle this rank's shard boundary.

    Raises:
        ValueError: naming the layer, its shard's rows and what would work.
    """
    from lightning_sparse.core.patterns import NM, Blocks

    if shard is None:
        return
    if isinstance(pattern, NM) and transposed:
        step, what = pattern.m, f"groups of m={pattern.m} along dim 0 (its input dimension)"
    elif isinstance(pattern, Blocks):
        step, what = pattern.rows, f"blocks of {pattern.rows} rows"
    else:
        return
    if shard.row_offset % step or (shard.rows % step and shard.row_offset + shard.rows != shard.global_shape[0]):
        raise ValueError(
            f"{name} is sharded on dim 0 (shape {shard.global_shape}; this rank holds rows {shard.row_offset} to "
            f"{shard.row_offset + shard.rows}), which splits its {what}; use a world size whose even chunks of "
            f"{shard.global_shape[0]} rows are multiples of {step}, or exclude {name!r}"
        )


def select_sharded_masks(
    scores: dict[str, Tensor],
    densities: dict[str, float],
    patterns: dict[str, object],
    shards: dict[str, Shard | None],
    global_shapes: dict[str, tuple[int, ...]],
    global_density: float | None = None,
    fixed: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Tensor]:
    """:func:`~lightning_sparse.core.selection.select_masks` on local shards: the masks of this rank's rows, equal
    to the rows of the masks one process computes from the whole scores (same budgets, same tie-break).

    Args:
        scores: layer name -> this rank's rows of its scores.
        densities, patterns, global_density, fixed: as in ``select_masks`` (patterns per layer).
        shards: layer name -> its :class:`Shard` (every layer must be sharded).
        global_shapes: layer name -> the whole weight's shape.

    Raises:
        ValueError: for a layer that is not sharded, or a global budget with an N:M pattern.
    """
    from lightning_sparse.core.patterns import NM

    plain = [name for name in scores if shards.get(name) is None]
    if plain:
        raise ValueError(f"under FSDP2 every target must be sharded, but {plain[0]} is a plain tensor; apply "
                         "fully_shard to the module that holds it in configure_model, or exclude it")
    group = shards[next(iter(scores))].group
    masks = {}
    pooled = [name for name in scores if global_density is not None and name not in fixed]
    for name in (n for n in scores if n not in pooled):
        pattern = patterns[name]
        if isinstance(pattern, NM):  # groups lie inside a shard's rows (check_shard)
            masks[name] = pattern.topk_mask(scores[name], densities[name])
            continue
        groups = pattern.group_scores(scores[name])
        k = round(densities[name] * pattern.num_groups(global_shapes[name]))
        masks[name] = pattern.expand(distributed_topk([groups], k, group)[0], tuple(scores[name].shape))
    if pooled:
        if any(isinstance(patterns[name], NM) for name in pooled):
            raise ValueError("distribution 'global' cannot be used with an N:M pattern; use 'uniform'")
        groups = [patterns[name].group_scores(scores[name]).float() for name in pooled]
        total = sum(patterns[name].num_groups(global_shapes[name]) for name in pooled)
        chosen = distributed_topk(groups, round(global_density * total), group)
        for name, chunk in zip(pooled, chosen, strict=True):
            masks[name] = patterns[name].expand(chunk, tuple(scores[name].shape))
    return {name: masks[name] for name in scores}


def reshard_after_abort(module: torch.nn.Module) -> None:
    """Put every FSDP2 module inside ``module`` back to its sharded state after a forward that was stopped by an
    exception (its post-forward, which reshards, never ran): its next call gathers the current shards again instead
    of reusing the stale unsharded weights."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
