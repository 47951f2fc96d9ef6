"""Argument checks shared by the bundled models and datamodules."""

from __future__ import annotations


def check_positive_int(**values: int) -> None:
    """Raises ``ValueError`` naming the first argument that is not an integer >= 1.

    Raises:
        ValueError: ``"<name> must be a positive integer, got <value>"``.

    Example::

        >>> check_positive_int(width=32, depth=2)
        >>> check_positive_int(width=0)
        Traceback (most recent call last):
        ...
        ValueError: width must be a positive integer, got 0
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
