"""Spartan's soft top-k: an exact solve of the scalar dual and an implicit-gradient backward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_sparse.core.masks import all_finite

__all__ = ["soft_topk", "soft_topk_threshold"]

_DIRECT_MAX = 1 << 17  # up to this many entries the solve starts from the exact hard threshold
_SAMPLE = 1 << 16  # above it, from the solution on a subsample of this size
_SAMPLE_SEED = 0x5BA27A4
_SAMPLE_RTOL = 1e-4
_MAX_EVALS = 200
_CHUNK = 4096
_EPS = 2.0**-52
_RTOL = {torch.float32: 2e-7, torch.float64: 1e-12}


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
    _check_args(scores, density, sharpness, costs)
    number = isinstance(guess, int | float) and not isinstance(guess, bool)
    if guess is not None and not (number and math.isfinite(guess)):
        raise ValueError(f"guess must be a finite number or None, got {guess!r}")
    if density == 1 or scores.numel() == 0:
        return -math.inf
    u, c = _unit_values(scores, costs)
    return _solve(u, c, float(density), float(sharpness), _RTOL[u.dtype], guess)[0]


def _check_args(scores: Tensor, density: float, sharpness: float, costs: Tensor | None) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        got = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"scores must be a floating-point tensor, got {got}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"sharpness must be a finite number > 0, got {sharpness}")
    if scores.numel() and not all_finite([scores]):
        raise ValueError("scores must be finite, got NaN or inf entries")
    if costs is not None:
        _check_costs(costs, scores.shape)


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
        t, mask = _solve(u, c, density, beta, _RTOL[u.dtype])
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
        ratio = _sum64(g * s) / max(_sum64(s if c is None else c * s), torch.finfo(torch.float64).tiny)
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
    z = _logits(u, t, beta, torch.empty_like(u))
    m = torch.sigmoid(z)
    return m, torch.sigmoid(z.neg_()).mul_(m)


def _sum64(x: Tensor) -> float:
    """Sum of a flat tensor: float32 partial sums of short chunks, accumulated in float64 (no float64 copy)."""
    if x.dtype == torch.float64:
        return x.sum().item()
    head = x.numel() - x.numel() % _CHUNK
    partial = x[:head].view(-1, _CHUNK).sum(1).sum(dtype=torch.float64)
    return (partial + x[head:].sum(dtype=torch.float64)).item()


def _logits(u: Tensor, t: float, beta: float, out: Tensor) -> Tensor:
    """out = beta * (u - t) for a float64 threshold t, accurate near t in u's dtype.

    t is split into t_c (t rounded to u's dtype) plus a small rest, so ``u - t_c`` is exact near the threshold
    and the rest enters as the offset ``beta * (t_c - t)``: a float32 mu = -beta * t would lose the digits.
    """
    finfo = torch.finfo(u.dtype)
    t_c = float(torch.tensor(min(max(t, -finfo.max), finfo.max), dtype=u.dtype))  # exact in u.dtype
    torch.sub(u, t_c, out=out)
    rest = torch.full((), (t_c - t) * beta, dtype=u.dtype, device=u.device)
    return torch.add(rest, out, alpha=beta, out=out)


class _Budget:
    """The budget equation in the threshold t = -mu / beta, as a decreasing log-residual g(t).

    ``residual(t)`` writes the mask into ``self.mask`` and returns g(t) = log(kept / budget) when
    density <= 1/2, else log(dropped budget / dropped mass), so g > 0 means the root lies above t. The logs
    make Newton exact on the exponential tails, where a Newton step on the plain sum crawls by 1 / beta.
    """

    def __init__(self, u: Tensor, c: Tensor | None, density: float, beta: float) -> None:
        self.u, self.c, self.beta = u, c, beta
        self.total = float(u.numel()) if c is None else _sum64(c)
        self.budget = density * self.total
        self.low = density <= 0.5
        self.mask = torch.empty_like(u)
        self.tmp = torch.empty_like(u)
        self.error = self.mass = math.nan

    def residual(self, t: float) -> float:
        _logits(self.u, t, self.beta, self.mask).sigmoid_()
        kept = _sum64(self.mask if self.c is None else torch.mul(self.mask, self.c, out=self.tmp))
        self.error = abs(kept - self.budget)
        if self.low:
            self.mass = kept
            return math.log1p((kept - self.budget) / self.budget) if kept > 0 else -math.inf
        self.mass = self.total - kept
        return -math.log1p((self.budget - kept) / (self.total - self.budget)) if self.mass > 0 else math.inf

    def inverse_slope(self) -> float:
        """-1 / g'(t) = mass / (beta * sum(c m (1 - m))) at the last mask; NaN where g is flat or infinite."""
        slope = torch.addcmul(self.mask, self.mask, self.mask, value=-1, out=self.tmp)
        slope = _sum64(slope if self.c is None else slope.mul_(self.c))
        return self.mass / (self.beta * slope) if self.mass > 0 and slope > 0 else math.nan


def _bracket(u: Tensor, density: float, beta: float) -> tuple[float, float]:
    """Thresholds where every m_i >= density (low) and every m_i <= density (high): the root lies between."""
    low, high = (x.item() for x in torch.aminmax(u))
    shift = math.log((1 - density) / density) / beta
    return low + shift, high + shift


@torch.no_grad()
def _solve(
    u: Tensor, c: Tensor | None, density: float, beta: float, rtol: float, guess: float | None = None
) -> tuple[float, Tensor]:
    """Threshold t with sum(c * sigmoid(beta * (u - t))) = density * sum(c) to rtol, and its mask."""
    problem = _Budget(u, c, density, beta)
    search = _Search(*_bracket(u, density, beta), resolution=torch.finfo(u.dtype).eps / beta)
    start = _initial_guess(u, c, density, beta) if guess is None else float(guess)
    t = min(max(start, search.lo), search.hi)
    best = (math.inf, t)
    for _ in range(_MAX_EVALS):
        g = problem.residual(t)
        if problem.error <= rtol * problem.budget:
            return t, problem.mask
        best = min(best, (problem.error, t))
        search.add(t, g)
        t = search.next(problem.inverse_slope)
        if t is None:
            break  # the bracket is below float resolution: no t meets rtol better than the best one seen
    problem.residual(best[1])
    return best[1], problem.mask


class _Search:
    """Safeguarded Newton search for the root of a decreasing g(t) (g > 0 below the root) in (lo, hi).

    Newton steps, four times longer when the last one shrank the residual by less than 10x on the same side
    (a linear, exponential approach: overshoot to bracket the root). While every evaluated point lies on one
    side of the root (one end is still the analytic bound), a step that leaves the bracket is replaced by a 4x
    longer step than the last; once evaluated points bracket the root, by Chandrupatla's inverse quadratic
    interpolation step, and the bracket is bisected when it did not halve over the last four steps, so the
    search always terminates.
    """

    def __init__(self, lo: float, hi: float, resolution: float) -> None:
        self.lo, self.hi, self.resolution = lo, hi, resolution
        self.a = self.b = self.c = None  # newest point, newest one across the root, the one before a
        self.widths: list[float] = []  # bracket widths since evaluated points bracket the root

    def add(self, t: float, g: float) -> None:
        if g > 0:
            self.lo = t
        else:
            self.hi = t
        if self.a is None or (g > 0) == (self.a[1] > 0):
            self.c, self.a = self.a, (t, g)
        else:
            self.c, self.b, self.a = self.b or self.c, self.a, (t, g)
        if self.b is not None:
            self.widths.append(self.hi - self.lo)

    def next(self, inverse_slope: Callable[[], float]) -> float | None:
        """The next t to evaluate, or None when the bracket is down to float resolution."""
        if self.b is not None and self.hi - self.lo < self.resolution:
            return None  # no m_i can change by more than its own rounding within the bracket
        stalled = len(self.widths) > 4 and self.widths[-1] > 0.5 * self.widths[-5]
        t = math.nan if stalled else self._newton(inverse_slope())
        if not (stalled or self.lo < t < self.hi):  # also catches NaN
            t = self._expand() if self.b is None else self._interpolate()
        if not self.lo < t < self.hi:
            t = 0.5 * (self.lo + self.hi)
        return t if self.lo < t < self.hi else None

    def _newton(self, inverse_slope: float) -> float:
        (t, g), previous = self.a, self.c
        slow = previous is not None and (previous[1] > 0) == (g > 0) and abs(g) > 0.1 * abs(previous[1])
        return t + g * inverse_slope * (4.0 if slow else 1.0)

    def _expand(self) -> float:
        return math.nan if self.c is None else self.a[0] + 4.0 * (self.a[0] - self.c[0])

    def _interpolate(self) -> float:
        (xa, fa), (xb, fb) = self.a, self.b
        edge = min(4 * _EPS * max(abs(xa), abs(xb)) / abs(xb - xa), 0.5)
        frac = fa / (fa - fb)
        if self.c is not None and self.c[0] != xb and self.c[1] not in (fa, fb):
            (xc, fc), xi, phi = self.c, (xa - xb) / (self.c[0] - xb), (fa - fb) / (self.c[1] - fb)
            iqi = phi**2 < xi and (1 - phi) ** 2 < 1 - xi
            frac = fa / (fb - fa) * fc / (fb - fc) + (xc - xa) / (xb - xa) * fa / (fc - fa) * fb / (fc - fb)
            frac = frac if iqi else 0.5
        frac = min(max(frac, edge), 1 - edge) if math.isfinite(frac) else 0.5
        return xa + frac * (xb - xa)


def _initial_guess(u: Tensor, c: Tensor | None, density: float, beta: float) -> float:
    """The hard threshold for small inputs, else the soft threshold of a fixed-seed random subsample."""
    if u.numel() <= _DIRECT_MAX:
        return _hard_threshold(u, c, density)
    generator = torch.Generator(device=u.device).manual_seed(_SAMPLE_SEED)
    index = torch.randint(u.numel(), (_SAMPLE,), generator=generator, device=u.device)
    return _solve(u[index], None if c is None else c[index], density, beta, _SAMPLE_RTOL)[0]


def _hard_threshold(u: Tensor, c: Tensor | None, density: float) -> float:
    """Unit value of the entry where the cumulative cost, in descending order of u, reaches the budget."""
    values, order = torch.sort(u, descending=True)
    cost = torch.ones_like(u) if c is None else c[order]
    cumulative = torch.cumsum(cost, 0, dtype=torch.float64)
    rank = torch.searchsorted(cumulative, density * cumulative[-1]).clamp_(max=u.numel() - 1)
    return values[rank].item()
