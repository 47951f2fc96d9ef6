r"""Schedules: optimizer step -> value, between ``start`` and ``end`` steps.

With progress :math:`p = \mathrm{clip}((t - t_0) / (t_1 - t_0), 0, 1)`, initial value :math:`v_i` and
final value :math:`v_f`:

.. math::

    \text{constant}:\ v_f \qquad
    \text{linear}:\ v_i + (v_f - v_i)\,p \qquad
    \text{cubic (Zhu \& Gupta)}:\ v_f + (v_i - v_f)(1 - p)^3

    \text{cosine}:\ v_f + (v_i - v_f)\,\tfrac{1 + \cos(\pi p)}{2} \qquad
    \text{exponential}:\ v_i\,(v_f / v_i)^{p}

``start``/``end`` are optimizer steps (``int``) or fractions of the run (``float`` in [0, 1]); fractions
are resolved with :meth:`Schedule.resolve` once the run's total steps are known.

Example::

    >>> schedule = build_schedule({"type": "cubic", "initial": 1.0, "final": 0.1, "start": 0, "end": 100})
    >>> [round(schedule(step), 4) for step in (0, 50, 100, 200)]
    [1.0, 0.2125, 0.1, 0.1]
    >>> build_schedule(0.5)(123)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

SHAPES = ("constant", "linear", "cubic", "cosine", "exponential")


def _check_point(argument: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be an int (optimizer step) or a float fraction of the run, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument} as a float is a fraction of the run and must be in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{argument} as an int is an optimizer step and must be >= 0, got {value}")


def resolve_step(value: int | float, total_steps: int | None, argument: str | None = None) -> int:
    """An ``int`` step as it is; a ``float`` fraction times ``total_steps`` (rounded). ``argument``: the value as the
    user wrote it (``"SparsityScheduler(end=0.75)"``), for the error.

    Raises:
        ValueError: for a fraction when ``total_steps`` is None.
    """
    if isinstance(value, int):
        return value
    if total_steps is None:
        raise ValueError(f"{argument or f'step {value}'} is a fraction of the run, whose length is unknown here (no "
                         "max_steps, and max_epochs=-1 or a dataloader without a length): set max_steps, or give it "
                         "as an int optimizer step")
    return round(value * total_steps)


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``initial`` to ``final`` between ``start`` and ``end`` along ``shape``."""

    final: float
    initial: float | None = None
    start: int | float = 0
    end: int | float = 0
    shape: str = "constant"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        _check_point("start", self.start)
        _check_point("end", self.end)
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"start must not be after end, got start={self.start}, end={self.end}")
        if self.shape == "exponential" and (self.initial is None or self.initial <= 0 or self.final <= 0):
            raise ValueError(f"shape 'exponential' needs initial and final > 0, got {self.initial}, {self.final}")

    def resolve(self, total_steps: int | None, owner: str = "") -> Schedule:
        """The same schedule with fractional ``start``/``end`` turned into steps. ``owner``: who holds the schedule,
        for errors (``"SparsityScheduler"`` names ``SparsityScheduler(end=...)``).

        Raises:
            ValueError: when the resolved ``start`` is after ``end``, or a fraction meets a run of unknown length.
        """
        start = resolve_step(self.start, total_steps, f"{owner}(start={self.start})" if owner else None)
        end = resolve_step(self.end, total_steps, f"{owner}(end={self.end})" if owner else None)
        if start > end:
            raise ValueError(f"start must not be after end, got start={self.start} -> step {start}, end={self.end}"
                             f" -> step {end}")
        return replace(self, start=start, end=end)

    def progress(self, step: int) -> float:
        """Fraction of the way from ``start`` to ``end`` at ``step``, clipped to [0, 1]."""
        start, end = resolve_step(self.start, None), resolve_step(self.end, None)
        if step >= end:
            return 1.0
        if step <= start:
            return 0.0
        return (step - start) / (end - start)

    def __call__(self, step: int) -> float:
        if self.shape == "constant" or self.initial is None:
            return float(self.final)
        p, v_i, v_f = self.progress(step), float(self.initial), float(self.final)
        if self.shape == "linear":
            return v_i + (v_f - v_i) * p
        if self.shape == "cubic":
            return v_f + (v_i - v_f) * (1.0 - p) ** 3
        if self.shape == "cosine":
            return v_f + (v_i - v_f) * (1.0 + math.cos(math.pi * p)) / 2.0
        return v_i * (v_f / v_i) ** p


def build_schedule(spec: float | Mapping | Schedule, **defaults) -> Schedule:
    """A :class:`Schedule` from a number (constant), a ``{"type": ..., ...}`` dict or a schedule.

    Dict keys: ``type`` (one of :data:`SHAPES`), ``initial``, ``final``, ``start``, ``end``; missing keys
    come from ``defaults``.

    Raises:
        ValueError: for an unknown ``type`` or unknown keys.
        TypeError: for any other kind of ``spec``.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"a schedule must be a number, a dict or a Schedule, got {spec!r}")
    if isinstance(spec, int | float):
        return Schedule(final=float(spec), shape="constant")
    if isinstance(spec, Mapping):
        fields = dict(spec)
        shape = fields.pop("type", defaults.pop("shape", "constant"))
        unknown = set(fields) - {"initial", "final", "start", "end"}
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}; allowed: type, initial, final, start, end")
        if shape not in SHAPES:
            raise ValueError(f"schedule type must be one of {SHAPES}, got {shape!r}")
        return Schedule(**{**defaults, **fields, "shape": shape})
    raise TypeError(f"a schedule must be a number, a dict or a Schedule, got {type(spec).__name__}: {spec!r}")
