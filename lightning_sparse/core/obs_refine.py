r"""Exact least-squares refit of kept weights, and N:M mask re-selection by exact group-wise coordinate descent.

Both solve, row by row, the layer-wise problem SparseGPT approximates: for a row :math:`w` and the (damped) Hessian
:math:`H` of its inputs, find :math:`w'` with the allowed zeros minimising :math:`(w - w') H (w - w')^\top`.

* :func:`refit_kept`: for a fixed mask with kept set :math:`K`, the optimum is
  :math:`w'_K = (H_{KK})^{-1} (H w^\top)_K`. SparseGPT's sweep only updates weights to the right of each pruned
  column, so this is never worse on the calibration data.
* :func:`reselect_nm`: one pass over the ``M``-column groups. For group :math:`G`, every other group's pattern is
  held fixed, :math:`F` = the kept columns outside :math:`G` plus all of :math:`G`, :math:`x` the optimum on
  :math:`F` and :math:`Q = [(H_{FF})^{-1}]_{GG}`; the pattern removes the ``M - N`` columns :math:`S` with the
  least exact joint OBS cost (Hassibi & Stork 1993; the group form is eq. (4) of Frantar & Alistarh 2022, "Optimal
  Brain Compression", https://arxiv.org/abs/2208.11580)

  .. math::

      \Delta L(S) = x_S^\top (Q_{SS})^{-1} x_S .

  The current pattern is a candidate, so a pass never increases the calibration error. :math:`(H_{KK})^{-1}` is kept
  per row and moved from group to group by rank-``2N`` updates, batched ``lazy`` groups at a time.

Cost: :math:`O(\text{rows} \cdot k^3)` for the refit and :math:`O(\text{rows} \cdot \text{cols} \cdot k^2)` per
re-selection pass (:math:`k` kept per row), against SparseGPT's :math:`O(\text{cols}^3 + \text{rows} \cdot
\text{cols}^2)`: affordable for layers of a few thousand inputs. Rows are processed in chunks to bound memory.

Example::

    >>> import torch
    >>> from lightning_sparse.core.patterns import NM
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    >>> h, w = 2 * x.T @ x / 512, torch.randn(4, 8, generator=g, dtype=torch.float64)
    >>> def error(mask):
    ...     delta = w - refit_kept(w, h, mask)
    ...     return float(((delta @ h) * delta).sum())
    >>> mask = NM(2, 4).topk_mask(w.abs(), 0.5)
    >>> better = reselect_nm(w, h, mask, NM(2, 4))
    >>> error(better) <= error(mask), better.reshape(-1, 4).sum(1).tolist()
    (True, [2, 2, 2, 2, 2, 2, 2, 2])
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from lightning_sparse.core.patterns import NM

_DTYPE = torch.float64
_CHUNK_ELEMENTS = 2**24  # rows * k * k per chunk


def _row_chunks(rows: int, k: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, k * k))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def refit_kept(weight: Tensor, hessian: Tensor, mask: Tensor) -> Tensor:
    """Least-squares optimal kept weights: row by row, :math:`w'_K = (H_{KK})^{-1} (H w^\\top)_K`, zeros elsewhere.

    Args:
        weight: ``(rows, cols)`` dense weights (the target).
        hessian: ``(cols, cols)`` positive definite (damped) Hessian.
        mask: ``(rows, cols)`` boolean, True = kept.

    Returns:
        float64 ``(rows, cols)`` weights, zero where ``mask`` is False.
    """
    w, h = weight.to(_DTYPE), hessian.to(_DTYPE)
    kept = mask.sum(1)
    width = int(kept.max()) if kept.numel() else 0
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # kept columns first
    valid = torch.arange(width, device=w.device)[None, :] < kept[:, None]
    rhs = (w @ h).gather(1, idx).masked_fill(~valid, 0.0)
    eye = torch.eye(width, dtype=_DTYPE, device=w.device)
    out = torch.zeros_like(w)
    for rows in _row_chunks(w.shape[0], width):
        i, v = idx[rows], valid[rows]
        sub = torch.where(v[:, :, None] & v[:, None, :], h[i[:, :, None], i[:, None, :]], eye)
        x = torch.cholesky_solve(rhs[rows, :, None], torch.linalg.cholesky(sub))[..., 0]
        out[rows].scatter_(1, i, x.masked_fill(~v, 0.0))
    return out


def check_refinement(nm_selection: str, refit: bool, reselect: int, nm: NM | None) -> None:
    """Validate the options of :func:`~lightning_sparse.core.obs.obs_prune` beyond SparseGPT's sweep.

    Raises:
        ValueError: an unknown ``nm_selection``; ``reselect < 0``; ``reselect > 0`` without ``nm`` or without
            ``refit``; more than 1024 patterns per group for the exact (``"joint"`` or ``reselect``) N:M choice.
        TypeError: ``refit`` not a bool or ``reselect`` not an int.
    """
    if nm_selection not in ("joint", "independent"):
        raise ValueError(f"nm_selection must be 'joint' or 'independent', got {nm_selection!r}")
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be a bool, got {type(refit).__name__}: {refit!r}")
    if isinstance(reselect, bool) or not isinstance(reselect, int):
        raise TypeError(f"reselect must be an int, got {type(reselect).__name__}: {reselect!r}")
    if reselect < 0:
        raise ValueError(f"reselect must be >= 0, got {reselect}")
    if reselect and nm is None:
        raise ValueError(f"reselect={reselect} re-selects N:M masks and needs nm='N:M', got unstructured pruning")
    if reselect and not refit:
        raise ValueError(f"reselect={reselect} re-selects masks for least-squares weights and needs refit=True")
    exact = nm is not None and (nm_selection == "joint" or reselect)
    if exact and math.comb(nm.m, nm.n) > 1024:
        raise ValueError(
            f"nm={str(nm)!r} has {math.comb(nm.m, nm.n)} patterns per group, more than the 1024 the exact "
            "choice enumerates; use nm_selection='independent' and reselect=0"
        )


def patterns(nm: NM, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(removed, kept)`` column offsets of every pattern of one group: ``(C, M - N)`` and ``(C, N)``."""
    kept = list(itertools.combinations(range(nm.m), nm.n))
    removed = [[j for j in range(nm.m) if j not in keep] for keep in kept]
    return torch.tensor(removed, device=device), torch.tensor(kept, device=device)


def _cheapest(q: Tensor, x: Tensor, removed: Tensor) -> Tensor:
    """Per row, the pattern whose removed set :math:`S` minimises :math:`x_S^\\top (Q_{SS})^{-1} x_S`."""
    q_s = q[:, removed[:, :, None], removed[:, None, :]]  # (rows, C, s, s)
    x_s = x[:, removed]  # (rows, C, s)
    cost = (x_s[..., None, :] @ torch.linalg.solve(q_s, x_s[..., None]))[..., 0, 0]
    return cost.argmin(1)


def _gather_square(a: Tensor, cols: Tensor) -> Tensor:
    """``a[r][cols[r]][:, cols[r]]`` for a batch of square matrices ``a`` and per-row index vectors ``cols``."""
    rows, n = cols.shape
    a = a.gather(1, cols[:, :, None].expand(rows, n, a.shape[2]))
    return a.gather(2, cols[:, None, :].expand(rows, n, n))


class _LowRankInverse:
    """Per-row inverses kept as ``base + lows @ cores @ lows^T``; the low-rank terms are folded into ``base`` once
    ``capacity`` columns of ``lows`` are used, so most products cost ``O(k * rank)`` instead of ``O(k^2)``."""

    def __init__(self, base: Tensor, capacity: int) -> None:
        self.base, self.used = base, 0
        self.lows = base.new_zeros(*base.shape[:2], capacity)
        self.cores = base.new_zeros(base.shape[0], capacity, capacity)

    def __matmul__(self, rhs: Tensor) -> Tensor:
        out = self.base @ rhs
        if self.used:
            low = self.lows[:, :, : self.used]
            out += low @ (self.cores[:, : self.used, : self.used] @ (low.transpose(1, 2) @ rhs))
        return out

    def add(self, low: Tensor, core: Tensor) -> None:
        """Add ``low @ core @ low^T``."""
        span = slice(self.used, self.used + low.shape[2])
        self.lows[:, :, span], self.cores[:, span, span] = low, core
        self.used = span.stop
        if self.used == self.lows.shape[2]:
            self.base += self.lows @ (self.cores @ self.lows.transpose(1, 2))
            self.cores.zero_()
            self.used = 0


def _regroup(inv: _LowRankInverse, h: Tensor, b: Tensor, idx: Tensor, g: int, nm: NM, options: tuple) -> None:
    """Re-choose the kept columns of group ``g`` (slots ``g*N ..``) and update ``idx`` and ``inv`` in place."""
    (rows, k), n, m = idx.shape, nm.n, nm.m
    slots, group = slice(g * n, g * n + n), torch.arange(g * m, g * m + m, device=h.device)
    eye = torch.eye(n, dtype=_DTYPE, device=h.device)
    rhs = torch.cat([h[idx[:, :, None], group], b.gather(1, idx)[:, :, None], h.new_zeros(rows, k, n)], 2)
    rhs[:, slots, m + 1 :] = eye
    z = inv @ rhs
    y, cur = z[:, :, : m + 1], z[:, :, m + 1 :]  # cur: columns `slots` of (H_KK)^-1
    inv_tt = torch.linalg.inv(cur[:, slots])
    y = y - cur @ (inv_tt @ y[:, slots])  # (H_OO)^-1 [H_OG, b_O], O = K without group g (zero on `slots`)
    h_og = rhs[:, :, :m]
    schur = h[group][:, group] - h_og.transpose(1, 2) @ y[:, :, :m]  # inverse of [(H_FF)^-1]_GG
    q = torch.linalg.inv(schur)
    x = (q @ (b[:, group] - (h_og * y[:, :, m:]).sum(1))[:, :, None])[:, :, 0]  # optimum on F, group part
    removed, kept = options
    keep = kept[_cheapest(q, x, removed)]
    new = y[:, :, :m].gather(2, keep[:, None, :].expand(rows, k, n))
    new[:, slots] = -eye
    core = h.new_zeros(rows, 2 * n, 2 * n)
    core[:, :n, :n], core[:, n:, n:] = -inv_tt, torch.linalg.inv(_gather_square(schur, keep))
    inv.add(torch.cat([cur, new], 2), core)  # remove the old kept columns of g, add the new ones
    idx[:, slots] = group[keep]


def _reselect_rows(w: Tensor, h: Tensor, mask: Tensor, nm: NM, lazy: int) -> Tensor:
    rows, cols = w.shape
    # kept columns, group-major: slots g*N .. g*N+N-1 hold group g's kept columns
    offsets = mask.reshape(rows, -1, nm.m).nonzero()[:, 2].reshape(rows, -1, nm.n)
    idx = (offsets + torch.arange(0, cols, nm.m, device=w.device)[None, :, None]).reshape(rows, -1)
    base = torch.cholesky_inverse(torch.linalg.cholesky(h[idx[:, :, None], idx[:, None, :]]))  # (H_KK)^-1
    inv, b, options = _LowRankInverse(base, 2 * nm.n * lazy), w @ h, patterns(nm, w.device)
    for g in range(cols // nm.m):
        _regroup(inv, h, b, idx, g, nm, options)
    return torch.zeros_like(mask).scatter_(1, idx, True)


def reselect_nm(weight: Tensor, hessian: Tensor, mask: Tensor, nm: NM, lazy: int = 16) -> Tensor:
    """One pass of exact group-wise N:M mask re-selection (see the module docstring); returns the new mask.

    Args:
        weight: ``(rows, cols)`` dense weights (the target).
        hessian: ``(cols, cols)`` positive definite (damped) Hessian.
        mask: ``(rows, cols)`` boolean N:M mask, exactly ``N`` kept in every ``M`` consecutive columns.
        nm: the pattern.
        lazy: groups between explicit updates of the per-row inverses.
    """
    w, h = weight.to(_DTYPE), hessian.to(_DTYPE)
    out = torch.empty_like(mask)
    for rows in _row_chunks(w.shape[0], w.shape[1] * nm.n // nm.m):
        out[rows] = _reselect_rows(w[rows], h, mask[rows], nm, lazy)
    return out
