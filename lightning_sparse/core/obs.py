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
once, :math:`W_{:, >b} \leftarrow W_{:, >b} - E\, U_{b, >b}`. The mask of a block (unstructured) or of each
``m``-column group (N:M) is chosen just before its columns are pruned, from the updated weights, by the OBS
saliency :math:`w^2 / U_{jj}^2` (the paper's :math:`w^2 / [H_F^{-1}]_{jj}`).

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
    h = hessian.to(_DTYPE)
    if not torch.isfinite(h).all():
        raise ValueError(f"the Hessian of {name} holds NaN/inf; check the calibration inputs of {name}")
    eye = torch.eye(h.shape[0], dtype=_DTYPE, device=h.device)
    mean_diag = h.diagonal().mean()
    levels = [damp] + [max(damp, 1e-4) * 10**k for k in (1, 2, 3)]
    for level in levels:
        chol, info = torch.linalg.cholesky_ex(h + level * mean_diag * eye)
        if info == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                if level != damp:
                    warnings.warn(f"the Hessian of {name} needed damp={level:g} (asked {damp:g})", stacklevel=2)
                return factor
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


def _prune_block(w: Tensor, u: Tensor, mask: Tensor, start: int, end: int, nm: NM | None, keep: int) -> Tensor:
    """OBS-prune columns ``start:end`` of ``w`` in place, filling ``mask``; returns the block's scaled errors."""
    block, ublock = w[:, start:end], u[start:end, start:end]
    diag = ublock.diagonal()
    errors = torch.zeros_like(block)
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

    Raises:
        ValueError: for both or neither of ``density``/``nm``, a bad pattern, ``M`` not dividing ``cols``, a Hessian
            of the wrong shape, ``block_size < 1`` or ``damp < 0``, or a Hessian that is not positive definite.
    """
    density, pattern = check_budget(density, nm)
    rows, cols = as_matrix_shape(weight.shape)
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the Hessian of {name} must be ({cols}, {cols}) for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size must be >= 1 and damp >= 0, got block_size={block_size}, damp={damp}")
    if pattern is not None:
        pattern.check(name, tuple(weight.shape))
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    w = weight.detach().reshape(rows, cols).to(_DTYPE).clone()
    h = hessian.detach().to(device=w.device, dtype=_DTYPE).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, damp, name)
    pruned = 0 if pattern is not None else rows * cols - round(density * rows * cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        keep = rows * (end - start) - (round(pruned * end / cols) - round(pruned * start / cols))
        errors = _prune_block(w, u, mask, start, end, pattern, keep)
        w[:, end:] -= errors @ u[start:end, end:]
    return w.reshape(weight.shape).to(weight.dtype), mask.reshape(weight.shape)
