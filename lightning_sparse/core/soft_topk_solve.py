r"""The scalar solve behind :func:`~lightning_sparse.core.soft_topk.soft_topk`: the threshold :math:`t` with
:math:`\sum_i c_i \sigma(\beta (u_i - t)) = \rho \sum_i c_i` to a relative tolerance, by a safeguarded Newton search
on a log-residual (exact on the exponential tails), with float64 accumulation of float32 passes.

With ``reduce`` (a function that sums a small float64 vector over every part of ``u``, e.g. an all-reduce over the
ranks that each hold some rows), :func:`solve` runs on one part of the entries: every sum it takes is the sum over
all parts, so every part takes the same steps to the same threshold (1 or 2 reductions of 2 numbers per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["RTOL", "Reduce", "logits", "solve", "sum64", "sum64_tensor"]

Reduce = Callable[[Tensor], Tensor]
"""Sums a float64 vector over every part of the entries (returns a new tensor, the same on every part)."""

_DIRECT_MAX = 1 << 17  # up to this many entries the solve starts from the exact hard threshold
_SAMPLE = 1 << 16  # above it, from the solution on a subsample of this size
_SAMPLE_SEED = 0x5BA27A4
_SAMPLE_RTOL = 1e-4
_MAX_EVALS = 200
_CHUNK = 4096
_EPS = 2.0**-52
_CANCELLATION = 1e-2  # below this fraction of the kept mass, sum(m) - m.m is summed exactly instead
RTOL = {torch.float32: 2e-7, torch.float64: 1e-12}


def sum64(x: Tensor) -> float:
    """Sum of a flat tensor: float32 partial sums of short chunks, accumulated in float64 (no float64 copy)."""
    return sum64_tensor(x).item()


def sum64_tensor(x: Tensor) -> Tensor:
    """:func:`sum64` as a 0-dim float64 tensor on ``x``'s device (no synchronization with it)."""
    if x.dtype == torch.float64:
        return x.sum()
    head = x.numel() - x.numel() % _CHUNK
    return x[:head].view(-1, _CHUNK).sum(1).sum(dtype=torch.float64) + x[head:].sum(dtype=torch.float64)


def logits(u: Tensor, t: float, beta: float, out: Tensor) -> Tensor:
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

    def __init__(self, u: Tensor, c: Tensor | None, density: float, beta: float, reduce: Reduce | None = None) -> None:
        self.u, self.c, self.beta, self.reduce = u, c, beta, reduce
        self.total = float(u.numel()) if c is None else sum64(c)
        if reduce is not None:
            self.total = reduce(torch.tensor([self.total], dtype=torch.float64)).item()
        self.budget = density * self.total
        self.dot = math.nan  # m.m over every part, taken with the kept mass when reduce is given
        self.low = density <= 0.5
        self.mask = torch.empty_like(u)
        self.tmp = torch.empty_like(u)
        self.error = self.mass = math.nan

    def residual(self, t: float) -> float:
        logits(self.u, t, self.beta, self.mask).sigmoid_()
        kept = sum64_tensor(self.mask if self.c is None else torch.mul(self.mask, self.c, out=self.tmp))
        if self.reduce is None:
            kept = kept.item()
        else:  # one reduction: the kept mass and m.m (the slope's first form) together
            dot = torch.dot(self.mask, self.mask).to(torch.float64) if self.c is None else kept.new_zeros(())
            kept, self.dot = self.reduce(torch.stack([kept, dot])).tolist()
        self.error = abs(kept - self.budget)
        if self.low:
            self.mass = kept
            return math.log1p((kept - self.budget) / self.budget) if kept > 0 else -math.inf
        self.mass = self.total - kept
        return -math.log1p((self.budget - kept) / (self.total - self.budget)) if self.mass > 0 else math.inf

    def inverse_slope(self) -> float:
        """-1 / g'(t) = mass / (beta * sum(c m (1 - m))) at the last mask; NaN where g is flat or infinite.

        Below half density (unit costs) the slope is first taken as ``kept - m.m``: one read pass, no write. When
        that difference is small against ``kept`` (sharp masks: float32 cancellation), it is summed exactly."""
        slope = math.nan
        if self.low and self.c is None:
            dot = torch.dot(self.mask, self.mask).item() if self.reduce is None else self.dot
            slope = self.mass - dot
        if not slope > _CANCELLATION * self.mass:
            slope = torch.addcmul(self.mask, self.mask, self.mask, value=-1, out=self.tmp)
            slope = sum64_tensor(slope if self.c is None else slope.mul_(self.c))
            slope = slope.item() if self.reduce is None else self.reduce(slope.reshape(1)).item()
        return self.mass / (self.beta * slope) if self.mass > 0 and slope > 0 else math.nan


def _bracket(
    u: Tensor, density: float, beta: float, extremes: tuple[float, float] | None = None
) -> tuple[float, float]:
    """Thresholds where every m_i >= density (low) and every m_i <= density (high): the root lies between.
    ``extremes`` is ``u``'s (min, max) when the caller has it already."""
    low, high = extremes if extremes is not None else (x.item() for x in torch.aminmax(u))
    shift = math.log((1 - density) / density) / beta
    return low + shift, high + shift


@torch.no_grad()
def solve(
    u: Tensor,
    c: Tensor | None,
    density: float,
    beta: float,
    rtol: float,
    guess: float | None = None,
    extremes: tuple[float, float] | None = None,
    reduce: Reduce | None = None,
) -> tuple[float, Tensor]:
    """Threshold t with sum(c * sigmoid(beta * (u - t))) = density * sum(c) to rtol, and its mask.
    ``extremes``: ``u``'s (min, max), when the caller has them (saves a pass). ``reduce``: ``u`` is one part of the
    entries and ``reduce`` sums over every part (see the module docstring); ``guess`` and ``extremes`` (over every
    part) are then required.

    Raises:
        ValueError: for ``reduce`` without ``guess`` or ``extremes``.
    """
    if reduce is not None and (guess is None or extremes is None):
        raise ValueError(f"solve(reduce=...) needs the guess and the extremes over every part, got guess={guess}, "
                         f"extremes={extremes}")
    problem = _Budget(u, c, density, beta, reduce)
    search = _Search(*_bracket(u, density, beta, extremes), resolution=torch.finfo(u.dtype).eps / beta)
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
    return solve(u[index], None if c is None else c[index], density, beta, _SAMPLE_RTOL)[0]


def _hard_threshold(u: Tensor, c: Tensor | None, density: float) -> float:
    """Unit value of the entry where the cumulative cost, in descending order of u, reaches the budget."""
    values, order = torch.sort(u, descending=True)
    cost = torch.ones_like(u) if c is None else c[order]
    cumulative = torch.cumsum(cost, 0, dtype=torch.float64)
    rank = torch.searchsorted(cumulative, density * cumulative[-1]).clamp_(max=u.numel() - 1)
    return values[rank].item()
