"""Argument checks shared by the bundled datamodules."""

from __future__ import annotations


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raises ``ValueError`` unless both fractions are in (0, 1) and leave room for a training split.

    Raises:
        ValueError: naming the offending argument(s) and value(s).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave a training split, "
            f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
