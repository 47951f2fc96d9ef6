"""Checks of the callbacks' scalar arguments: a TypeError or ValueError that names the argument, shows the value and
says what is allowed."""

from __future__ import annotations

import math
from typing import Any


def check_int(argument: str, value: int, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")
    return value


def check_float(argument: str, value: float, low: float, high: float, closed: str) -> float:
    """``value`` as a float if it lies in ``[low, high)`` (``closed="[)"``) or ``(low, high]`` (``closed="(]"``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be a float, got {type(value).__name__}: {value!r}")
    inside = (low <= value < high) if closed == "[)" else (low < value <= high)
    if not inside or math.isnan(value):
        interval = f"[{low}, {high})" if closed == "[)" else f"({low}, {high}]"
        raise ValueError(f"{argument} must be in {interval}, got {value}")
    return float(value)


def check_positive(argument: str, value: float | None) -> float | None:
    """``None``, or ``value`` as a float if it is finite and ``> 0``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be a float > 0, got {type(value).__name__}: {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{argument} must be a finite number > 0, got {value}")
    return float(value)


def check_step(argument: str, value: int | float | None) -> int | float | None:
    """``None``, an int optimizer step ``>= 0``, or a float fraction of the run in ``[0, 1]``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be an int step, a float fraction of the run or None, got {value!r}")
    if (isinstance(value, float) and not 0.0 <= value <= 1.0) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{argument} must be an int step >= 0 or a float fraction in [0, 1], got {value}")
    return value


def check_choice(argument: str, value: Any, allowed: tuple) -> Any:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {list(allowed)}, got {value!r}")
    return value
