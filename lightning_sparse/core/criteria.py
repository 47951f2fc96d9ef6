r"""Drop and grow criteria of dynamic sparse training: the registry, SET's sign-split drop, SNFS redistribution.

A criterion turns ``(param, grad, optimizer_state)`` into scores of the parameter's shape; higher means more
important (kept when dropping, grown first when growing). The built-in names are computed by
:class:`~lightning_sparse.callbacks.DynamicSparseTraining` from :mod:`lightning_sparse.core.scores`; any other
name must be registered with :func:`register_criterion` (so YAML configs can name it).

SNFS redistribution (Dettmers & Zettlemoyer 2019, https://arxiv.org/abs/1907.04840) splits the total dropped
count :math:`D = \sum_l d_l` over the layers in proportion to their mean momentum magnitude :math:`\bar m_l`
(over active weights), each layer capped by its room :math:`c_l` (inactive positions after the drop):

.. math::

    g_l = \min(c_l,\ \lambda \bar m_l), \qquad \lambda \text{ such that } \sum_l g_l = D,

solved exactly by water-filling (capped layers are fixed at :math:`c_l`, the rest re-split), then rounded to
integers by largest remainder (ties: earlier layer first), so :math:`\sum_l g_l = D` exactly.

The means :math:`\bar m_l` are computed in fixed point (:func:`fixed_point_sum`): an exact integer sum, the same
whatever the order of the values or how FSDP2 splits them over ranks, so sharded and single-process runs agree.

Example::

    >>> import torch
    >>> values = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    >>> drop_by_sign(values, torch.ones(5, dtype=torch.bool), 2).tolist()
    [True, False, False, True, True]
    >>> redistribute({"a": 2, "b": 2}, capacities={"a": 3, "b": 10}, weights={"a": 3.0, "b": 1.0})
    {'a': 3, 'b': 1}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_sparse.core import scores
from lightning_sparse.core.masks import drop_lowest

CriterionFn = Callable[[Tensor, Tensor | None, Mapping[str, Any]], Tensor]

DROP_CRITERIA = ("magnitude", "set", "mest", "snip", "reciprocal_sensitivity", "random")
GROW_CRITERIA = ("random", "gradient", "momentum")
GRADIENT_CRITERIA = frozenset({"gradient", "mest", "snip", "reciprocal_sensitivity"})
_REGISTERED: dict[str, CriterionFn] = {}


class ScoreInputs(NamedTuple):
    """What a built-in criterion may read: the weight, the step's dense gradient, the dense-gradient momentum,
    the callback's generator and MEST's gamma."""

    param: Tensor
    grad: Tensor | None
    momentum: Tensor | None
    generator: torch.Generator
    gamma: float


_BUILTIN_SCORES: dict[str, Callable[[ScoreInputs], Tensor]] = {
    "magnitude": lambda x: scores.magnitude(x.param),
    "set": lambda x: x.param.detach().float(),  # signed: dropped by drop_by_sign
    "mest": lambda x: scores.mest(x.param, x.grad, x.gamma),
    "snip": lambda x: scores.snip(x.param, x.grad),
    "reciprocal_sensitivity": lambda x: scores.reciprocal_sensitivity(x.param, x.grad),
    "random": lambda x: scores.random(x.param, x.generator),
    "gradient": lambda x: scores.gradient(x.grad),
    "momentum": lambda x: scores.momentum({"momentum_buffer": x.momentum}),
}


def builtin_scores(name: str, inputs: ScoreInputs) -> Tensor:
    """Scores of the built-in criterion ``name`` (``"set"`` gives the signed weight, for :func:`drop_by_sign`)."""
    return _BUILTIN_SCORES[name](inputs)


def register_criterion(name: str, fn: CriterionFn) -> None:
    """Make ``fn(param, grad, optimizer_state) -> scores`` usable by name as a drop or grow criterion.

    ``grad`` is the step's dense gradient (``None`` when the parameter has none); ``optimizer_state`` is the
    optimizer's state of that parameter (a dict, empty before the first step).

    Raises:
        TypeError: when ``name`` is not a string or ``fn`` is not callable.
        ValueError: when ``name`` is a built-in criterion.

    Example::

        from lightning_sparse.callbacks import DynamicSparseTraining
        from lightning_sparse.core.criteria import register_criterion

        register_criterion("taylor", lambda w, g, state: (w * g) ** 2)
        DynamicSparseTraining(drop="taylor", density=0.1)  # or drop: taylor in YAML
    """
    if not isinstance(name, str):
        raise TypeError(f"criterion name must be a string, got {type(name).__name__}: {name!r}")
    if not callable(fn):
        raise TypeError(f"criterion {name!r} must be callable (param, grad, optimizer_state) -> scores, got {fn!r}")
    if name in DROP_CRITERIA or name in GROW_CRITERIA:
        raise ValueError(f"criterion name {name!r} is built in; choose another name")
    _REGISTERED[name] = fn


def registered_criterion(name: str) -> CriterionFn | None:
    """The function registered under ``name``, or None."""
    return _REGISTERED.get(name)


def check_criterion(argument: str, value: str | CriterionFn, builtins: tuple[str, ...]) -> str | CriterionFn:
    """Return ``value`` when it is a callable, a built-in name or a registered name.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything else.
    """
    if callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a criterion name or a callable, got {type(value).__name__}: {value!r}")
    if value not in builtins and value not in _REGISTERED:
        known = [*builtins, *sorted(_REGISTERED)]
        raise ValueError(
            f"{argument} must be one of {known} (or a callable (param, grad, optimizer_state) -> scores, "
            f"or a name added with register_criterion), got {value!r}"
        )
    return value


def criterion_name(criterion: str | CriterionFn) -> str:
    """A readable name for messages."""
    return criterion if isinstance(criterion, str) else getattr(criterion, "__qualname__", repr(criterion))


def check_scores(criterion: str | CriterionFn, scores: Any, param: Tensor) -> Tensor:
    """Return ``scores`` when it is a tensor of ``param``'s shape.

    Raises:
        ValueError: naming the criterion and both shapes otherwise.
    """
    shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
    if shape != tuple(param.shape):
        raise ValueError(
            f"criterion {criterion_name(criterion)!r} returned scores of shape {shape}, "
            f"but the parameter has shape {tuple(param.shape)}"
        )
    return scores


def drop_by_sign(values: Tensor, mask: Tensor, n: int) -> Tensor:
    """SET's drop: remove the active values closest to zero on each side of zero separately.

    ``ceil(n / 2)`` of the smallest non-negative and ``floor(n / 2)`` of the negative values closest to zero;
    when one sign has too few active values, the other gives the rest, so exactly ``n`` are dropped.

    Args:
        values: signed values (weights, or block means).
        mask: active positions, same shape.
        n: how many to drop, ``0 <= n <= mask.sum()``.

    Raises:
        ValueError: when ``n`` exceeds the active count.
    """
    positive, negative = mask & (values >= 0), mask & (values < 0)
    n_positive, n_negative = sign_split(n, int(positive.sum()), int(negative.sum()))
    magnitudes = values.abs()
    return drop_lowest(magnitudes, positive, n_positive) | drop_lowest(magnitudes, negative, n_negative)


def sign_split(n: int, n_positive_active: int, n_negative_active: int) -> tuple[int, int]:
    """How many of ``n`` drops :func:`drop_by_sign` takes from the non-negative and from the negative active values.

    Raises:
        ValueError: when ``n`` exceeds the active count.

    Example::

        >>> sign_split(5, 10, 1)
        (4, 1)
    """
    if not 0 <= n <= n_positive_active + n_negative_active:
        raise ValueError(f"n must be in [0, {n_positive_active + n_negative_active}] (the active count), got {n}")
    n_negative = min(n_negative_active, n // 2)
    n_positive = min(n_positive_active, n - n_negative)
    return n_positive, n - n_positive


def redistribute(drops: Mapping[str, int], capacities: Mapping[str, int], weights: Mapping[str, float]) -> dict:
    """Split ``sum(drops)`` over the layers in proportion to ``weights``, each capped by its capacity.

    See the module docstring for the formula. Layers of weight 0 receive only what the others cannot hold
    (then in proportion to their free room).

    Raises:
        ValueError: when the capacities cannot hold the total.
    """
    total = sum(drops.values())
    if total > sum(capacities.values()):
        raise ValueError(f"capacities {dict(capacities)} cannot hold the {total} weights to regrow")
    shares = dict.fromkeys(drops, Fraction(0))
    free, left = [n for n in drops if capacities[n] > 0], Fraction(total)
    while left > 0 and free:
        parts = {n: Fraction(max(float(weights[n]), 0.0)) for n in free}
        if sum(parts.values()) == 0:
            parts = {n: Fraction(capacities[n]) for n in free}
        norm = sum(parts.values())
        capped = [n for n in free if left * parts[n] / norm >= capacities[n]]
        if not capped:
            shares.update({n: left * parts[n] / norm for n in free})
            break
        for n in capped:
            shares[n], left = Fraction(capacities[n]), left - capacities[n]
        free = [n for n in free if n not in capped]
    return _largest_remainder(shares, total)


def fixed_point_shift(peak: float, count: int) -> int:
    """The exponent ``s`` for which ``count`` values in ``[0, peak]``, each scaled by ``2**s`` and floored, sum below
    ``2**62`` (no int64 overflow); the largest keeps ``61 - count.bit_length()`` bits (30 for a billion values).
    ``0`` for ``peak <= 0``."""
    if peak <= 0:
        return 0
    return 62 - max(count, 1).bit_length() - math.frexp(peak)[1]  # frexp: peak < 2**exponent


def fixed_point_sum(values: Tensor, shift: int) -> int:
    """``sum(floor(v * 2**shift))`` over non-negative ``values``, exactly (integer additions: any order, any split
    of the values gives the same number). Float64 holds every float32 value and power-of-two scale exactly.

    Example::

        >>> fixed_point_sum(torch.tensor([0.5, 0.25, 0.125]), 3)
        7
    """
    return int(torch.floor(values.detach().double() * 2.0**shift).to(torch.int64).sum())


def fixed_point_mean(total: int, count: int, shift: int) -> float:
    """The mean ``total / (count * 2**shift)`` of :func:`fixed_point_sum`'s values, rounded once; ``0.0`` when empty."""
    return float(Fraction(total, count) / Fraction(2) ** shift) if count else 0.0


def _largest_remainder(shares: Mapping[str, Fraction], total: int) -> dict[str, int]:
    counts = {n: math.floor(s) for n, s in shares.items()}
    order = sorted(shares, key=lambda n: shares[n] - counts[n], reverse=True)  # stable: earlier layer first
    for n in order[: total - sum(counts.values())]:
        counts[n] += 1
    return counts
