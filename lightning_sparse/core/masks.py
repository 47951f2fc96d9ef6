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

import math

import numpy as np
import torch
from torch import Tensor

SAMPLE_STRIDE = 16  # sampled selection hints read every 16th entry
MIN_SAMPLED = 1 << 16  # below this many entries one selection over all of them is cheap enough
# Selection and compares on CPU tensors run in numpy (shared memory, no copies of the inputs): its introselect
# (``np.partition``) is 3.5-4x faster than ``torch.kthvalue`` on 0.4M-25M floats here, its compares into a bool array
# 2-3x faster than torch's, and its boolean indexing 4x faster. Other devices use torch. Results are identical.
NUMPY_DEVICES = ("cpu",)  # device types whose selections and compares run in numpy


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one ``aminmax`` pass each (NaN propagates to the extremes),
    several times faster on the CPU than ``isfinite(t).all()``, and one device synchronization in all."""
    floats = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    extremes = torch.stack([torch.stack(torch.aminmax(t.detach())).to(floats[0].device, torch.float32) for t in floats])
    return bool(torch.isfinite(extremes).all())


def _check_finite(scores: Tensor, argument: str = "scores") -> None:
    if not all_finite([scores]):
        raise ValueError(f"{argument} must be finite, got {int((~torch.isfinite(scores)).sum())} NaN/inf entries")


def topk_flat(flat: Tensor, k: int, bracket: tuple[float, float] | None = None) -> Tensor:
    """Mask of the ``k`` highest entries of a flat tensor, ties at the k-th value to the lowest indices.

    One selection (``kthvalue``, O(n)) and a compare instead of a sort: the result equals the first ``k`` of a
    stable descending sort. See :func:`topk_threshold` for ``bracket``.
    """
    return topk_threshold(flat, k, bracket)[0]


def topk_threshold(flat: Tensor, k: int, bracket: tuple[float, float] | None = None) -> tuple[Tensor, float]:
    """:func:`topk_flat`'s mask and the k-th highest value (``-inf`` for ``k == 0``).

    ``bracket`` is an optional hint ``(low, high)``: values a little under and a little over the k-th highest one
    (e.g. the previous training step's k-th value minus and plus a margin; ``high`` may be ``inf``). When it does
    hold the k-th value, the selection runs on the entries between ``low`` and ``high`` only; otherwise on all of
    them. Without a hint, large tensors get one from a strided sample. The result is the same either way.
    """
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be in [0, {flat.numel()}], got {k}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k == 0:
        return mask, -math.inf
    values = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    if k == flat.numel():
        return mask.fill_(True), values.min().item()
    if bracket is None:
        bracket = _sampled_hint(values, k)
    kth = None if bracket is None else _kth_in_bracket(values, k, bracket, mask)
    if kth is None:
        kth = _kth_smallest(values, values.numel() - k + 1)
    _compare(values, "ge", kth, mask)
    if count_true(mask) != k:  # ties at the k-th value: the lowest indices among them are kept
        _compare(values, "gt", kth, mask)
        missing = k - count_true(mask)
        mask[flat_nonzero(values == kth)[:missing]] = True
    return mask, kth


def _sampled_hint(values: Tensor, k: int) -> tuple[float, float] | None:
    """``(low, inf)`` with ``low`` expected a little under the k-th highest: the matching rank of a strided sample.

    Only for large tensors and small ``k`` (where one selection over everything costs most); ``None`` otherwise.
    A poor hint (an adversarial layout) only costs the fallback to the full selection: results never change.
    """
    n = values.numel()
    rank = math.ceil(1.25 * k / SAMPLE_STRIDE) + 8
    if n < MIN_SAMPLED or 4 * k > n or rank >= n // SAMPLE_STRIDE:
        return None
    sample = values[::SAMPLE_STRIDE]
    return _kth_smallest(sample, sample.numel() - rank + 1), math.inf


def _kth_in_bracket(values: Tensor, k: int, bracket: tuple[float, float], buffer: Tensor) -> float | None:
    """The k-th highest value, selected among the entries in ``(low, high]``; None when it is not in there or
    more than half of the entries are (then one selection over all of them is as cheap)."""
    low, high = bracket
    above = None if high == math.inf else _compare(values, "gt", high, torch.empty_like(buffer))
    above_high = 0 if above is None else count_true(above)
    if above_high >= k:
        return None
    in_band = count_true(_compare(values, "gt", low, buffer)) - above_high
    if above_high + in_band < k or 2 * in_band > values.numel():
        return None
    if above is not None:
        buffer &= above.logical_not_()  # (low, high]: above low and not above high
    return _kth_smallest(values, in_band - (k - above_high) + 1, where=buffer)


_COMPARES = {"gt": (np.greater, torch.gt), "ge": (np.greater_equal, torch.ge)}


def _compare(values: Tensor, op: str, x: float, out: Tensor) -> Tensor:
    """``out = values <op> x`` (bool), with ``x`` rounded to ``values``' dtype as torch does."""
    numpy_op, torch_op = _COMPARES[op]
    if values.device.type in NUMPY_DEVICES:
        array = values.detach().numpy()
        numpy_op(array, array.dtype.type(x), out=out.numpy())
        return out
    return torch_op(values, x, out=out)


def count_true(mask: Tensor) -> int:
    """Number of True entries of a bool tensor (numpy's count on CPU tensors: 5x faster than torch's here)."""
    if mask.device.type in NUMPY_DEVICES:
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def _kth_smallest(values: Tensor, rank: int, where: Tensor | None = None) -> float:
    """The ``rank``-th smallest (1-based) of the flat ``values`` (of those where ``where`` is True)."""
    if values.device.type in NUMPY_DEVICES:
        array = values.detach().numpy()
        array = array if where is None else array[where.numpy()]
        return float(np.partition(array, rank - 1)[rank - 1])
    return float(torch.kthvalue(values if where is None else values[where], rank).values)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask keeping exactly the ``k`` highest scores.

    Args:
        scores: any shape, finite.
        k: how many to keep, ``0 <= k <= scores.numel()``.

    Raises:
        ValueError: when ``k`` is out of range or ``scores`` holds NaN/inf.
    """
    _check_finite(scores)
    return topk_flat(scores.reshape(-1), k).reshape(scores.shape)


def drop_lowest(scores: Tensor, mask: Tensor, n: int) -> Tensor:
    """Deactivate the ``n`` active positions (``mask`` True) with the lowest scores (ties: the higher index goes).

    Raises:
        ValueError: when ``n`` exceeds the number of active positions.
    """
    active = flat_nonzero(mask)
    if not 0 <= n <= active.numel():
        raise ValueError(f"n must be in [0, {active.numel()}] (the active count), got {n}")
    kept = keep_highest_among(scores, active, active.numel() - n)
    return indices_to_mask(kept, mask.shape, mask.device)


def grow_highest(scores: Tensor, mask: Tensor, n: int) -> Tensor:
    """Activate the ``n`` inactive positions (``mask`` False) with the highest scores (ties: the lower index grows).

    Raises:
        ValueError: when ``n`` exceeds the number of inactive positions.
    """
    return grow_around(scores, flat_nonzero(mask), n).reshape(mask.shape)


def keep_highest_among(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Flat indices (ascending) of the ``k`` highest ``scores`` among the flat indices ``candidates`` (ascending);
    ties go to the lower index. Reads only the candidates' scores (after one finiteness pass over them).

    Raises:
        ValueError: when ``k`` exceeds the number of candidates or the candidates' scores are not finite.
    """
    if not 0 <= k <= candidates.numel():
        raise ValueError(f"k must be in [0, {candidates.numel()}] (the candidate count), got {k}")
    values = scores.reshape(-1).to(candidates.device)[candidates]
    _check_finite(values)
    return candidates[flat_nonzero(topk_flat(values, k))]


def grow_around(scores: Tensor, taken: Tensor, n: int, overwrite: bool = False) -> Tensor:
    """Flat bool mask of the positions in ``taken`` (flat indices) plus the ``n`` other positions of highest
    ``scores`` (ties: the lower index grows).

    One copy of the scores with the taken positions set to ``-inf`` and one exact top-k over it; cheap when
    ``taken`` is a small part of the tensor (no pass over a boolean mask). ``overwrite=True`` writes the ``-inf``
    into float ``scores`` themselves instead of a copy (for scores the caller computed and no longer needs).

    Raises:
        ValueError: when ``n`` exceeds the number of positions not taken, or ``scores`` are not finite.
    """
    free = scores.numel() - taken.numel()
    if not 0 <= n <= free:
        raise ValueError(f"n must be in [0, {free}] (the inactive count), got {n}")
    _check_finite(scores)
    flat = scores.reshape(-1).to(taken.device)
    dtype = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
    values = flat.to(dtype, copy=not overwrite)  # other dtypes are converted (a copy) either way
    values[taken] = -math.inf
    chosen = topk_flat(values, n)
    chosen[taken] = True
    return chosen


def flat_nonzero(mask: Tensor) -> Tensor:
    """Flat indices (int64, ascending) of a bool tensor's True entries (numpy's on CPU tensors: 2.4x faster)."""
    flat = mask.reshape(-1)
    if flat.device.type in NUMPY_DEVICES:
        return torch.from_numpy(np.flatnonzero(flat.numpy()))
    return torch.nonzero(flat).squeeze(1)


def indices_to_mask(indices: Tensor, shape: tuple[int, ...] | torch.Size, device: torch.device) -> Tensor:
    """Bool tensor of ``shape``, True at the flat ``indices``."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
    mask[indices] = True
    return mask.reshape(shape)
