r"""Spartan's budgets under FSDP2: each rank holds some rows of every weight of a budget.

* :func:`solve_sharded_budgets`: the exact hard top-k through
  :func:`~lightning_sparse.distributed.distributed_topk_each` (one batched radix select for all one-layer budgets;
  :func:`~lightning_sparse.distributed.distributed_topk` for a pooled one: the single-process sets and tie-break),
  and the soft threshold :math:`t` by the single-process solve (:func:`~lightning_sparse.core.soft_topk_solve.solve`)
  whose every sum is all-reduced: per solve of all budgets, one all-reduce of 3 float64 extremes per budget (min, max
  and the hard top-k's k-th value, 24 bytes); per budget, one of its size (8 bytes) and per Newton step one of 2
  float64 (kept mass and :math:`m \cdot m`, 16 bytes), plus 8 bytes when the slope needs its exact form. The
  threshold meets the same budget to the same tolerance as one process's, but it is not bit-identical to it: the
  float64 sums add the ranks' partial sums, in another order than one process's chunked sum, so the Newton steps see
  sums that differ in the last bits (and the first solve starts from the hard top-k's k-th value).
* :func:`whole_groups` / :func:`local_groups`: per-group values (the frozen soft mask) gathered whole for a
  checkpoint, and this rank's part of them again.
* :func:`sharded_gradients`: the soft mask's implicit gradient on the local rows: each rank's part of
  :math:`\partial L / \partial t` and :math:`\sum_i c_i s_i`, one all-reduce of 2 float64 per budget (16 bytes) per
  optimizer step for all budgets together, then each rank finishes its rows (what ``threshold_node`` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_sparse.callbacks.spartan_budget import Budget, _guess
from lightning_sparse.core.patterns import Blocks, Pattern
from lightning_sparse.core.soft_mask import finish_partial_backward, group_magnitudes, spartan_partial_backward
from lightning_sparse.core.soft_topk_solve import RTOL, solve
from lightning_sparse.distributed import (
    TRAFFIC,
    Shard,
    all_reduce_max,
    all_reduce_sum,
    distributed_topk,
    distributed_topk_each,
    group_shard,
    rows_of,
    whole_of,
)


def _reducer(group: object):
    def reduce(values: Tensor) -> Tensor:
        TRAFFIC["elements"] += values.numel()
        return all_reduce_sum(values, group)

    return reduce


def _extremes(parts: Sequence[Tensor], kept: Sequence[Tensor], group: object) -> list[tuple[float, float, float]]:
    """Per budget: (min, max) of every rank's values and the lowest kept value (the hard top-k's k-th), all budgets
    in one all-reduce of 3 numbers each."""
    inf = torch.tensor(math.inf, dtype=torch.float64)
    rows = []
    for flat, chosen in zip(parts, kept, strict=True):
        low = flat.min().double() if flat.numel() else inf
        high = flat.max().double() if flat.numel() else -inf
        kth = flat[chosen].min().double() if chosen.any() else inf
        rows.append(torch.stack([-low, high, -kth]))
    TRAFFIC["elements"] += 3 * len(rows)
    return [(-a, b, -c) for a, b, c in all_reduce_max(torch.stack(rows), group).tolist()] if rows else []


def _hard_masks(parts: list[list[Tensor]], ks: list[int], group: object) -> list[list[Tensor]]:
    """The exact hard top-k of every budget: the one-layer budgets in one batched selection, a pooled one (several
    layers, one k) on its own."""
    single = [i for i, layers in enumerate(parts) if len(layers) == 1]
    chosen: dict[int, list[Tensor]] = {}
    if single:
        masks = distributed_topk_each([parts[i][0] for i in single], [ks[i] for i in single], group)
        chosen.update({i: [m] for i, m in zip(single, masks, strict=True)})
    for i in (i for i in range(len(parts)) if i not in chosen):
        chosen[i] = distributed_topk(parts[i], ks[i], group)
    return [chosen[i] for i in range(len(parts))]


@torch.no_grad()
def solve_sharded_budgets(
    rows: Mapping[str, Tensor],
    budgets: Sequence[tuple[Sequence[str], float]],
    shapes: Mapping[str, tuple[int, ...]],
    pattern: Pattern,
    sharpness: float,
    previous: Mapping[str, Budget],
    group: object,
) -> list[tuple[Budget, dict[str, Tensor]]]:
    """:func:`~lightning_sparse.callbacks.spartan_budget.solve_budget` of every budget ``(names, density)`` on this
    rank's ``rows`` of the weights (whole shapes ``shapes``); ``previous``: the last budget of each weight. Every
    rank of ``group`` calls it with the same budgets.

    Returns per budget the :class:`Budget` (the same on every rank) and the hard mask of this rank's rows of each
    weight."""
    todo = [i for i, (_, density) in enumerate(budgets) if density < 1]
    parts = [[group_magnitudes(rows[n], pattern) for n in budgets[i][0]] for i in todo]
    ks = [round(budgets[i][1] * sum(pattern.num_groups(tuple(shapes[n])) for n in budgets[i][0])) for i in todo]
    hard = _hard_masks(parts, ks, group)
    flats, kept = [torch.cat(p) for p in parts], [torch.cat(h) for h in hard]
    extremes = dict(zip(todo, zip(flats, hard, _extremes(flats, kept, group), strict=True), strict=True))
    out = []
    for i, (names, density) in enumerate(budgets):
        before_budget = previous.get(names[0])
        before = None if before_budget is None else before_budget.threshold
        if i not in extremes:  # density 1: no threshold, everything kept
            masks = {n: torch.ones_like(rows[n], dtype=torch.bool) for n in names}
            out.append((Budget(tuple(names), -math.inf, sharpness, before=before), masks))
            continue
        flat, chosen, (low, high, kth) = extremes[i]
        guess = _guess(before_budget)
        threshold, _ = solve(flat, None, float(density), float(sharpness), RTOL[flat.dtype],
                             kth if guess is None else guess, (low, high), _reducer(group))
        masks = {n: pattern.expand(c, tuple(rows[n].shape)) for n, c in zip(names, chosen, strict=True)}
        out.append((Budget(tuple(names), threshold, sharpness, before=before), masks))
    return out


def sharded_gradients(
    budgets: Sequence[Budget],
    dense: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    pattern: Pattern,
    costs: Mapping[str, float],
    group: object,
) -> dict[str, Tensor]:
    """dL/d(dense rows) of every target in ``grads`` from dL/d(effective rows), for the soft masks of ``budgets``
    (one all-reduce of 2 float64 per budget, all budgets at once)."""
    out, pending, sums = {}, [], []
    for budget in budgets:
        names = [n for n in budget.names if n in grads]
        if budget.threshold == -math.inf:  # density 1: the effective weight is the weight
            out.update({n: grads[n] for n in names})
            continue
        partial_t = torch.zeros((), dtype=torch.float64)
        partial_s = torch.zeros((), dtype=torch.float64)
        for name in names:
            threshold = torch.tensor(budget.threshold, dtype=torch.float32, device=dense[name].device)  # the forward's
            direct, signed, grad_t, slope = spartan_partial_backward(dense[name], grads[name], pattern, threshold,
                                                                     budget.sharpness, costs[name])
            partial_t, partial_s = partial_t + grad_t.double().cpu(), partial_s + costs[name] * slope.cpu()
            pending.append((name, len(sums), direct, signed))
        sums.append(torch.stack([partial_t, partial_s]))
    if sums:
        TRAFFIC["elements"] += 2 * len(sums)
        totals = all_reduce_sum(torch.stack(sums), group)
        for name, index, direct, signed in pending:
            grad_t, slope = totals[index].to(direct.device)
            out[name] = finish_partial_backward(direct, signed, grad_t, slope, pattern)
    return out


def _grid(values: Tensor, shard: Shard, pattern: Pattern, shape: tuple[int, ...]) -> tuple[Tensor, Shard]:
    """Flat per-group values as rows of groups, and where this rank's rows of groups sit."""
    rows = pattern.rows if isinstance(pattern, Blocks) else 1
    columns = pattern.num_groups(shape) // (shape[0] // rows)
    return values.reshape(-1, columns), group_shard(shard, rows, shape[0] // rows)


def whole_groups(values: Tensor, shard: Shard | None, pattern: Pattern, shape: tuple[int, ...]) -> Tensor:
    """Every group's value of a weight of ``shape`` from this rank's flat ``values`` (gathered: every rank calls it),
    flat, on the CPU."""
    if shard is None:
        return values.cpu().clone()
    grid, rows = _grid(values, shard, pattern, shape)
    return whole_of(grid, rows).reshape(-1).cpu()


def local_groups(values: Tensor, shard: Shard | None, pattern: Pattern, shape: tuple[int, ...]) -> Tensor:
    """This rank's part of every group's flat ``values`` (the inverse of :func:`whole_groups`)."""
    if shard is None:
        return values
    grid, rows = _grid(values, shard, pattern, shape)
    return rows_of(grid, rows).reshape(-1)
