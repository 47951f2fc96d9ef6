r"""Optimal Brain Surgeon pruning of one layer with column-block updates (SparseGPT).

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
https://arxiv.org/abs/2301.00774. For a weight :math:`W` (rows x cols, Conv weights flattened to
``(out, in * kh * kw)``) and the Hessian of its layer-wise squared error, :math:`H = 2 X X^\top / n`, columns
are pruned left to right. With :math:`U` the upper Cholesky factor of :math:`(H + \lambda I)^{-1}`
(:math:`U^\top U = (H + \lambda I)^{-1}`, :math:`\lambda` = ``damp`` times the mean of :math:`\operatorname{diag} H`),
pruning column :math:`j` to :math:`q_j` (its kept entries, zeros elsewhere) updates the later columns by

.. math::

    e_j = \frac{w_j - q_j}{U_{jj}}, \qquad W_{:, k} \leftarrow W_{:, k} - e_j U_{jk} \quad (k > j),

inside a block of ``block_size`` columns; the accumulated errors :math:`E` of a block update all later columns at
once, :math:`W_{:, >b} \leftarrow W_{:, >b} - E\, U_{b, >b}`. The mask of a block (unstructured) is chosen just
before its columns are pruned, from the updated weights, by the OBS saliency :math:`w^2 / U_{jj}^2` (the paper's
:math:`w^2 / [H_F^{-1}]_{jj}`); so is each ``M``-column group's with ``nm_selection="independent"``.

N:M with ``nm_selection="joint"`` (the default) chooses the ``M - N`` weights :math:`S` of a group :math:`G` to remove
together, by the exact OBS error of removing them at once while every later weight of the row (the group's kept
ones included) compensates, over all :math:`\binom{M}{N}` patterns (6 for 2:4), and applies that joint update:

.. math::

    \Delta L(S) = w_S^\top \big([H_F^{-1}]_{SS}\big)^{-1} w_S, \quad [H_F^{-1}]_{GG} = U_{GG}^\top U_{GG},
    \qquad W_{:, \geq G} \leftarrow W_{:, \geq G} - c\, U_{G, \geq G}, \quad
    c = U_{G, S} \big([H_F^{-1}]_{SS}\big)^{-1} w_S

(:math:`F`: the columns not yet pruned), the multi-weight form of Optimal Brain Surgeon (Hassibi & Stork 1993) used
for groups by "Optimal Brain Compression" (Frantar & Alistarh 2022, https://arxiv.org/abs/2208.11580). It is the best
pattern for the group given the sweep so far, where the per-weight scores ignore how two removed inputs correlate.
``refit`` and ``reselect`` go further, with per-row least squares (:mod:`lightning_sparse.core.obs_refine`).

Unlike NVIDIA ModelOpt, which keeps only the mask, the updated weights are returned. Unstructured budgets are exact:
``round(density * numel)`` weights are kept per layer, spread over the blocks by cumulative rounding. Inputs that
never fire (:math:`H_{jj} = 0`) get :math:`H_{jj} = 1` and a zero weight column, as in the paper. All arithmetic is
float64.

Example::

    >>> import torch
    >>> x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    >>> w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    >>> new_w, mask = obs_prune(w, hessian_from_inputs(x), nm="2:4")
    >>> mask.reshape(-1, 4).sum(1).unique().tolist(), bool((new_w[~mask] == 0).all())
    ([2], True)
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_sparse.core.density import check_density
from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.obs_refine import check_refinement, patterns, refit_kept, reselect_nm
from lightning_sparse.core.patterns import NM, as_matrix_shape, parse_pattern

_DTYPE = torch.float64


def hessian_from_inputs(inputs: Tensor) -> Tensor:
    """:math:`2 X^\\top X / n` (float64) for layer inputs ``inputs`` of shape ``(n, cols)``."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(_DTYPE)
    return 2 * x.T @ x / x.shape[0]


def reconstruction_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """Relative output error :math:`\\lVert (W - W') X \\rVert_F / \\lVert W X \\rVert_F`, computed from the Hessian
    of the inputs :math:`X` (:math:`\\lVert A X \\rVert_F^2 \\propto \\operatorname{tr}(A H A^\\top)`)."""
    rows, cols = as_matrix_shape(weight.shape)
    w = weight.detach().reshape(rows, cols).to(_DTYPE)
    delta = w - new_weight.detach().reshape(rows, cols).to(_DTYPE)
    h = hessian.to(_DTYPE)
    return float(((delta @ h) * delta).sum().clamp_min(0).sqrt() / ((w @ h) * w).sum().sqrt())


def inverse_hessian_factor(hessian: Tensor, damp: float = 0.01, name: str = "weight") -> Tensor:
    """Upper Cholesky factor :math:`U` of :math:`(H + \\lambda I)^{-1}`, :math:`\\lambda = d \\cdot \\overline{H_{jj}}`.

    When :math:`H + \\lambda I` is not numerically positive definite, the damping ``d`` is retried at x10, x100 and
    x1000 (from at least 1e-4), with a warning.

    Raises:
        ValueError: when ``hessian`` holds NaN/inf, or no damping level makes it positive definite.
    """
    return _damped_factor(hessian, damp, name)[1]


def _damped_factor(hessian: Tensor, damp: float, name: str) -> tuple[Tensor, Tensor]:
    """``(H + lambda I, U)`` for the first damping level that works (see :func:`inverse_hessian_factor`)."""
    h = hessian.to(_DTYPE)
    if not torch.isfinite(h).all():
        raise ValueError(f"the Hessian of {name} holds NaN/inf; check the calibration inputs of {name}")
    eye = torch.eye(h.shape[0], dtype=_DTYPE, device=h.device)
    mean_diag = h.diagonal().mean()
    levels = [damp] + [max(damp, 1e-4) * 10**k for k in (1, 2, 3)]
    for level in levels:
        damped = h + level * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                if level != damp:
                    warnings.warn(f"the Hessian of {name} needed damp={level:g} (asked {damp:g})", stacklevel=2)
                return damped, factor
    raise ValueError(
        f"the Hessian of {name} is not positive definite even with damp={levels[-1]:g} x mean(diag(H)); "
        "use more calibration data or a larger damp"
    )


def check_budget(density: float | None, nm: str | NM | None) -> tuple[float | None, NM | None]:
    """``(density, None)`` or ``(None, NM pattern)``.

    Raises:
        ValueError: for both or neither given, a density outside (0, 1], or ``nm`` not ``"N:M"`` with ``0 < N < M``.
        TypeError: for a density that is not a number or an ``nm`` that is not a string.
    """
    if (density is None) == (nm is None):
        raise ValueError(f"give exactly one of density= (unstructured) or nm= ('N:M'), got {density=}, {nm=}")
    if nm is None:
        return check_density(density), None
    pattern = parse_pattern(nm)
    if not isinstance(pattern, NM):
        raise ValueError(f"nm must be an 'N:M' pattern such as '2:4', got {nm!r}")
    return None, pattern


def _joint_groups(block: Tensor, ublock: Tensor, mask: Tensor, errors: Tensor, removed: Tensor, m: int) -> None:
    """OBS-prune a block group by group, each group's removal set :math:`S` chosen and removed jointly (in place)."""
    rows = torch.arange(block.shape[0], device=block.device)
    for j in range(0, block.shape[1], m):
        group = slice(j, j + m)
        u = ublock[group, group]
        inv = u.T @ u  # the group's block of the inverse Hessian of the columns not yet pruned
        sub_inv = torch.linalg.inv(inv[removed[:, :, None], removed[:, None, :]])  # (C, s, s)
        w_s = block[:, group][:, removed]  # (rows, C, s)
        best = torch.einsum("rcs,cst,rct->rc", w_s, sub_inv, w_s).argmin(1)
        lift = u[:, removed].permute(1, 0, 2) @ sub_inv  # (C, M, s)
        errors[:, group] = torch.einsum("rms,rs->rm", lift[best], w_s[rows, best])
        mask[:, group] = torch.ones_like(mask[:, group]).scatter_(1, removed[best], False)
        block[:, j:] -= errors[:, group] @ ublock[group, j:]
        block[:, group].masked_fill_(~mask[:, group], 0.0)


def _prune_block(
    w: Tensor, u: Tensor, mask: Tensor, start: int, end: int, nm: NM | None, keep: int, removed: Tensor | None
) -> Tensor:
    """OBS-prune columns ``start:end`` of ``w`` in place, filling ``mask``; returns the block's scaled errors.
    ``removed``: the removal sets of every N:M pattern for the joint choice (None: per-column saliency)."""
    block, ublock = w[:, start:end], u[start:end, start:end]
    diag = ublock.diagonal()
    errors = torch.zeros_like(block)
    if removed is not None:
        _joint_groups(block, ublock, mask[:, start:end], errors, removed, nm.m)
        return errors
    if nm is None:
        mask[:, start:end] = topk_mask(block.square() / diag.square(), keep)
    for j in range(end - start):
        if nm is not None and j % nm.m == 0:
            group = slice(j, j + nm.m)
            scores = block[:, group].square() / diag[group].square()
            mask[:, start + j : start + j + nm.m] = nm.topk_mask(scores, nm.density)
        kept = mask[:, start + j]
        error = torch.where(kept, 0.0, block[:, j]) / diag[j]
        block[:, j:] -= error[:, None] * ublock[j, j:][None, :]
        block[:, j].masked_fill_(~kept, 0.0)
        errors[:, j] = error
    return errors


def obs_prune(
    weight: Tensor,
    hessian: Tensor,
    density: float | None = None,
    nm: str | NM | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "weight",
    nm_selection: str = "joint",
    refit: bool = False,
    reselect: int = 0,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` with SparseGPT's OBS updates; returns ``(new_weight, mask)`` of ``weight``'s shape and dtype.

    Args:
        weight: ``(rows, ...)``; viewed as ``(rows, cols)``.
        hessian: ``(cols, cols)``, :math:`2 X^\\top X / n` of the layer inputs (see :func:`hessian_from_inputs`).
        density: fraction kept (unstructured); exactly ``round(density * numel)`` weights are kept.
        nm: ``"N:M"``: ``N`` kept in every ``M`` consecutive columns of each row.
        block_size: columns per lazy-update block (rounded down to a multiple of ``M``, at least ``M``).
        damp: dampening, relative to the mean of :math:`\\operatorname{diag} H`.
        name: the layer's name, for error messages.
        nm_selection: ``"joint"`` (default) removes the ``M - N`` weights of a group with the least exact joint OBS
            error, :math:`w_S^\\top ([H_F^{-1}]_{SS})^{-1} w_S`, and updates every later weight of the row, the
            group's kept ones included; ``"independent"``: the paper's per-weight saliency and column-by-column
            updates.
        refit: replace the kept weights by their least-squares optimum on the damped Hessian
            (:func:`~lightning_sparse.core.obs_refine.refit_kept`); never worse on the calibration data, but
            :math:`O(\\text{rows} \\cdot k^3)`.
        reselect: passes of exact group-wise N:M mask re-selection
            (:func:`~lightning_sparse.core.obs_refine.reselect_nm`) after the sweep; needs ``nm`` and ``refit``.

    Raises:
        ValueError: for both or neither of ``density``/``nm``, a bad pattern, ``M`` not dividing ``cols``, a Hessian
            of the wrong shape, ``block_size < 1`` or ``damp < 0``, a Hessian that is not positive definite, or a bad
            option (see :func:`~lightning_sparse.core.obs_refine.check_refinement`).
    """
    density, pattern = check_budget(density, nm)
    check_refinement(nm_selection, refit, reselect, pattern)
    rows, cols = as_matrix_shape(weight.shape)
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"the Hessian of {name} must be ({cols}, {cols}) for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size must be >= 1 and damp >= 0, got block_size={block_size}, damp={damp}")
    removed = None
    if pattern is not None:
        pattern.check(name, tuple(weight.shape))
        block_size = max(pattern.m, block_size - block_size % pattern.m)
        removed = patterns(pattern, weight.device)[0] if nm_selection == "joint" else None
    target = weight.detach().reshape(rows, cols).to(_DTYPE).clone()
    h = hessian.detach().to(device=target.device, dtype=_DTYPE).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    target[:, dead] = 0.0
    damped, u = _damped_factor(h, damp, name)
    w = target.clone()
    pruned = 0 if pattern is not None else rows * cols - round(density * rows * cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        keep = rows * (end - start) - (round(pruned * end / cols) - round(pruned * start / cols))
        errors = _prune_block(w, u, mask, start, end, pattern, keep, removed)
        w[:, end:] -= errors @ u[start:end, end:]
    for _ in range(reselect):
        mask = reselect_nm(target, damped, mask, pattern)
    if refit:
        w = refit_kept(target, damped, mask)
    return w.reshape(weight.shape).to(weight.dtype), mask.reshape(weight.shape)
