"""Spartan's soft top-k: an exact solve of the scalar dual and an implicit-gradient backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_sparse.core.masks import all_finite
from lightning_sparse.core.soft_topk_solve import RTOL, logits, solve, sum64

__all__ = ["soft_topk", "soft_topk_threshold"]


def soft_topk(scores: Tensor, density: float, sharpness: float, costs: Tensor | None = None) -> Tensor:
    r"""Soft top-k mask of Spartan: the entropic optimal transport of the scores onto "keep" and "drop".

    Each entry :math:`i` has a value :math:`v_i` (``scores``) and a cost :math:`c_i` (``costs``, ones by
    default, e.g. the number of weights in a block). Its unit value is :math:`u_i = v_i / c_i` and the budget
    is :math:`k = \rho \sum_i c_i` with :math:`\rho` = ``density``, the fraction of cost kept. The two-bin
    entropic OT with regularisation :math:`1/\beta` (:math:`\beta` = ``sharpness``) has the closed form

    .. math::

        m_i = \sigma(\beta u_i + \mu), \qquad \sigma(x) = \frac{1}{1 + e^{-x}},

    where the scalar dual :math:`\mu` is the root of the monotone budget equation

    .. math::

        f(\mu) = \sum_i c_i\, \sigma(\beta u_i + \mu) - \rho \sum_i c_i = 0.

    The root is solved exactly, not by a few early-stopped Sinkhorn updates: safeguarded Newton steps on the
    log of the kept (or dropped) mass, started from the hard threshold or from the solution on a fixed-seed
    subsample, inside a bracket with interpolation and bisection fallbacks. Each step is one pass over the
    data with float64 accumulation, and :math:`\sum_i c_i m_i` meets the budget to float rounding: within
    :math:`10^{-6}` relative in float32 for densities down to :math:`10^{-4}` (typically :math:`10^{-7}`), and
    to about :math:`10^{-12}` in float64.
    :math:`\beta` is in the raw units of :math:`u` (no normalisation, as in the reference implementation);
    a large :math:`\beta` approaches the hard top-k.
    The backward pass applies the implicit function theorem to the budget equation in :math:`O(n)`:

    .. math::

        \frac{\partial L}{\partial v_j} = \beta\, s_j \Big(\frac{g_j}{c_j} - \frac{\sum_i g_i s_i}
        {\sum_i c_i s_i}\Big), \qquad s_i = m_i (1 - m_i), \quad g = \frac{\partial L}{\partial m}.

    Gradients also flow to ``costs`` when they require grad (through :math:`u` and the budget).

    Paper: Spartan, Tai, Tian & Lim, NeurIPS 2022, https://arxiv.org/abs/2205.14107.

    Args:
        scores: Values :math:`v` of the entries, any shape, floating point and finite. float16/bfloat16 are
            computed in float32 and the mask is rounded back to their dtype, so the budget then holds only to
            that rounding.
        density: Fraction of the total cost kept, in (0, 1]. ``1`` returns ones (a constant, no graph).
        sharpness: Inverse temperature :math:`\beta > 0`.
        costs: Positive cost of each entry, same shape as ``scores``; ``None`` means all ones.

    Returns:
        The soft mask, same shape and dtype as ``scores``, values in [0, 1].

    Raises:
        TypeError: If ``scores`` is not a floating-point tensor.
        ValueError: If ``density`` is outside (0, 1], ``sharpness`` is not a finite number > 0, ``scores``
            holds NaN or inf, ``costs`` has the wrong shape or non-positive or non-finite entries, or the unit
            values ``scores / costs`` overflow.

    Example::

        >>> import torch
        >>> scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> mask = soft_topk(scores, density=0.1, sharpness=10.0)
        >>> round(mask.sum().item(), 3)
        100.0
        >>> bool(((mask > 0.5) == (scores >= scores.topk(100).values[-1])).float().mean() > 0.9)
        True
    """
    _check_args(scores, density, sharpness, costs)
    if density == 1 or scores.numel() == 0:
        return torch.ones_like(scores)
    return _SoftTopK.apply(scores, costs, float(density), float(sharpness))


def soft_topk_threshold(
    scores: Tensor, density: float, sharpness: float, costs: Tensor | None = None, guess: float | None = None
) -> float:
    r"""The threshold :math:`t = -\mu / \beta` of :func:`soft_topk`, without building a mask graph.

    :func:`soft_topk` returns :math:`\sigma(\beta (u - t))` with :math:`u` = ``scores / costs``; callers that
    rebuild that mask themselves (per layer, from a threshold shared by many layers) solve for :math:`t` once here.

    Args:
        scores: Values :math:`v` of the entries, as in :func:`soft_topk`.
        density: Fraction of the total cost kept, in (0, 1]; ``1`` (or no entries) gives ``-inf`` (keep all).
        sharpness: Inverse temperature :math:`\beta > 0`.
        costs: Positive cost of each entry, same shape as ``scores``; ``None`` means all ones.
        guess: A threshold near the root to start from, e.g. the previous training step's: two or three passes
            over the data then reach the budget. The result meets the same tolerance with or without it.

    Returns:
        The threshold as a Python float (solved in float64 arithmetic).

    Raises:
        TypeError: If ``scores`` is not a floating-point tensor.
        ValueError: As :func:`soft_topk`; or ``guess`` is not a finite number.

    Example::

        >>> import torch
        >>> scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> t = soft_topk_threshold(scores, density=0.1, sharpness=10.0)
        >>> round(torch.sigmoid(10.0 * (scores - t)).sum().item(), 2)
        100.0
    """
    extremes = _check_args(scores, density, sharpness, costs)
    number = isinstance(guess, int | float) and not isinstance(guess, bool)
    if guess is not None and not (number and math.isfinite(guess)):
        raise ValueError(f"guess must be a finite number or None, got {guess!r}")
    if density == 1 or scores.numel() == 0:
        return -math.inf
    u, c = _unit_values(scores, costs)
    extremes = extremes if c is None else None  # the unit values are the scores themselves
    return solve(u, c, float(density), float(sharpness), RTOL[u.dtype], guess, extremes)[0]


def _check_args(
    scores: Tensor, density: float, sharpness: float, costs: Tensor | None
) -> tuple[float, float] | None:
    """Raise for bad arguments; returns the scores' (min, max), which the solve's bracket reuses."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        got = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"scores must be a floating-point tensor, got {got}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"sharpness must be a finite number > 0, got {sharpness}")
    extremes = None
    if scores.numel():
        extremes = tuple(torch.stack(torch.aminmax(scores.detach())).tolist())  # NaN propagates to the extremes
        if not all(map(math.isfinite, extremes)):
            raise ValueError("scores must be finite, got NaN or inf entries")
    if costs is not None:
        _check_costs(costs, scores.shape)
    return extremes


def _check_costs(costs: Tensor, shape: torch.Size) -> None:
    if costs.shape != shape:
        raise ValueError(f"costs must have the shape of scores {tuple(shape)}, got {tuple(costs.shape)}")
    if costs.numel():
        low, high = torch.aminmax(costs.detach())
        if not (low > 0 and torch.isfinite(high)):
            raise ValueError(f"costs must be positive and finite, got entries in [{low.item()}, {high.item()}]")


class _SoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, costs: Tensor | None, density: float, beta: float) -> Tensor:
        u, c = _unit_values(scores, costs)
        t, mask = solve(u, c, density, beta, RTOL[u.dtype])
        ctx.save_for_backward(scores, costs)
        ctx.t, ctx.density, ctx.beta = t, density, beta
        return mask.view(scores.shape).to(scores.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        scores, costs = ctx.saved_tensors
        u, c = _unit_values(scores, costs)
        m, s = _mask_and_slope(u, ctx.t, ctx.beta)
        g = grad.reshape(-1).to(u.dtype)
        ratio = sum64(g * s) / max(sum64(s if c is None else c * s), torch.finfo(torch.float64).tiny)
        grad_v = ((g if c is None else g / c) - ratio).mul_(s).mul_(ctx.beta)
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = (m - ctx.density).mul_(-ratio).sub_(u * grad_v).view(costs.shape).to(costs.dtype)
        grad_s = grad_v.view(scores.shape).to(scores.dtype) if ctx.needs_input_grad[0] else None
        return grad_s, grad_c, None, None


def _unit_values(scores: Tensor, costs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Flat unit values u = scores / costs and flat costs, in float64 for float64 scores and float32 otherwise."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    u = scores.detach().reshape(-1).to(dtype)
    if costs is None:
        return u, None
    c = costs.detach().reshape(-1).to(dtype)
    u = u / c
    if not all_finite([u]):
        raise ValueError(f"scores / costs must be finite, got overflow in {dtype} (costs too small?)")
    return u, c


def _mask_and_slope(u: Tensor, t: float, beta: float) -> tuple[Tensor, Tensor]:
    """m = sigmoid(z) and s = m (1 - m) = sigmoid(z) sigmoid(-z), with z = beta (u - t)."""
    z = logits(u, t, beta, torch.empty_like(u))
    m = torch.sigmoid(z)
    return m, torch.sigmoid(z.neg_()).mul_(m)
