"""Exact top-k, drop and grow on score tensors, with a deterministic tie-break.

Every function returns a boolean mask of the scores' shape and keeps *exactly* the number of
elements asked for. Ties are broken by position: among equal scores the lower flat index wins, so
the result never depends on the kernel, the thread count or the process.

Example::

    >>> import torch
    >>> topk_mask(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist()
    [False, True, True, False]
    >>> mask = torch.tensor([True, True, False, False])
    >>> drop_lowest(torch.tensor([5.0, 1.0, 0.0, 0.0]), mask, 1).tolist()
    [True, False, False, False]
    >>> grow_highest(torch.tensor([0.0, 0.0, 0.2, 0.9]), mask, 1).tolist()
    [True, True, False, True]
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_finite(scores: Tensor, argument: str = "scores") -> None:
    if scores.is_floating_point() and not torch.isfinite(scores).all():
        raise ValueError(f"{argument} must be finite, got {int((~torch.isfinite(scores)).sum())} NaN/inf entries")


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` highest scores; ties go to the lower flat index."""
    flat = scores.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be in [0, {flat.numel()}], got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.sort(flat, descending=True, stable=True).indices[:k]


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask keeping exactly the ``k`` highest scores.

    Args:
        scores: any shape, finite.
        k: how many to keep, ``0 <= k <= scores.numel()``.

    Raises:
        ValueError: when ``k`` is out of range or ``scores`` holds NaN/inf.
    """
    _check_finite(scores)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[topk_indices(scores, k)] = True
    return mask.reshape(scores.shape)


def drop_lowest(scores: Tensor, mask: Tensor, n: int) -> Tensor:
    """Deactivate the ``n`` active positions (``mask`` True) with the lowest scores.

    Raises:
        ValueError: when ``n`` exceeds the number of active positions.
    """
    active = int(mask.sum())
    if not 0 <= n <= active:
        raise ValueError(f"n must be in [0, {active}] (the active count), got {n}")
    _check_finite(scores)
    keep_scores = torch.where(mask, scores.float(), torch.tensor(float("-inf"), device=scores.device))
    return topk_mask_allow_inf(keep_scores, active - n)


def grow_highest(scores: Tensor, mask: Tensor, n: int) -> Tensor:
    """Activate the ``n`` inactive positions (``mask`` False) with the highest scores.

    Raises:
        ValueError: when ``n`` exceeds the number of inactive positions.
    """
    inactive = int((~mask).sum())
    if not 0 <= n <= inactive:
        raise ValueError(f"n must be in [0, {inactive}] (the inactive count), got {n}")
    _check_finite(scores)
    grow_scores = torch.where(mask, torch.tensor(float("-inf"), device=scores.device), scores.float())
    return mask | topk_mask_allow_inf(grow_scores, n)


def topk_mask_allow_inf(scores: Tensor, k: int) -> Tensor:
    """:func:`topk_mask` for scores that may hold ``-inf`` sentinels (never NaN)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[topk_indices(scores, k)] = True
    return mask.reshape(scores.shape)
