r"""Per-layer density allocation: uniform, Erdős–Rényi (ER), ER-Kernel (ERK); ``global`` is decided by scores.

ER and ERK give layer :math:`l` the density :math:`\epsilon \cdot r_l`, with

.. math::

    r_l^{ER} = \frac{n_{in} + n_{out}}{n_{in} n_{out}}, \qquad
    r_l^{ERK} = \frac{\sum_i s_i}{\prod_i s_i} \quad (s = \text{the weight's shape}),

and :math:`\epsilon` solved so the kept count equals the uniform budget. A layer whose density would
exceed 1 is made dense and :math:`\epsilon` is solved again over the rest (the saturation re-solve of RigL).

Example::

    >>> shapes = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}
    >>> {k: round(v, 4) for k, v in allocate_densities(shapes, 0.1, "erk").items()}
    {'fc1': 0.0796, 'fc2': 0.2302, 'fc3': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

DISTRIBUTIONS = ("uniform", "er", "erk", "global")


def check_density(density: float, argument: str = "density") -> float:
    """Return ``density`` as a float after checking ``0 < density <= 1``.

    Raises:
        TypeError: when it is not a real number.
        ValueError: when it is outside ``(0, 1]``.
    """
    if isinstance(density, bool) or not isinstance(density, int | float):
        raise TypeError(f"{argument} must be a float in (0, 1], got {type(density).__name__}: {density!r}")
    if not 0.0 < density <= 1.0 or math.isnan(density):
        raise ValueError(f"{argument} must be in (0, 1] (the fraction of weights kept), got {density}")
    return float(density)


def check_distribution(distribution: str) -> str:
    """Raise ``ValueError`` unless ``distribution`` is one of :data:`DISTRIBUTIONS`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def _raw_er(shape: tuple[int, ...]) -> float:
    n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
    return (n_in + n_out) / (n_in * n_out)


def _raw_erk(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


def _solve_erdos_renyi(shapes: Mapping[str, tuple[int, ...]], density: float, raw) -> dict[str, float]:
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    scores = {name: raw(shape) for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            return dict.fromkeys(shapes, 1.0)
        epsilon = (budget - sum(sizes[n] for n in dense)) / sum(scores[n] * sizes[n] for n in sparse)
        top = max(scores[n] for n in sparse)
        if epsilon * top <= 1.0:
            return {name: 1.0 if name in dense else epsilon * scores[name] for name in shapes}
        dense.update(n for n in sparse if scores[n] == top)


def allocate_densities(
    shapes: Mapping[str, tuple[int, ...]],
    density: float,
    distribution: str = "uniform",
    fixed: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Density per layer so that the free layers together keep ``density`` of their weights.

    Args:
        shapes: parameter name -> weight shape.
        density: overall fraction kept among the layers not in ``fixed``.
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``. ``"global"`` returns the uniform numbers:
            its per-layer split comes from one top-k over all layers' scores.
        fixed: layers with a density of their own (not compensated by the others).

    Raises:
        ValueError: for an unknown distribution or a density outside ``(0, 1]``.
    """
    check_density(density)
    check_distribution(distribution)
    fixed = dict(fixed or {})
    free = {name: tuple(shape) for name, shape in shapes.items() if name not in fixed}
    if distribution in ("uniform", "global") or not free:
        solved = dict.fromkeys(free, density)
    else:
        solved = _solve_erdos_renyi(free, density, _raw_er if distribution == "er" else _raw_erk)
    return {name: fixed[name] if name in fixed else solved[name] for name in shapes}
