"""The table :class:`~lightning_sparse.callbacks.KernelBenchmark` prints: per layer, the dense and the exported
module's times in milliseconds, the speed-up (dense time / sparse time: above 1 is faster) and, beside it, the
verdict; on CUDA, one more speed-up column per other candidate kernel.

Example::

    >>> row = {"name": "fc", "type": "Linear", "matrix_shape": [64, 128], "tokens": 32, "stored_density": 0.25,
    ...        "reason": None, "faster": True, "speedup": 1.6, "speedups": {"SparseLinear": 1.6},
    ...        "times_ms": {"dense F.linear": 2.0, "SparseLinear": 1.25}}
    >>> header, rows = table_rows({"layers": [row]})
    >>> dict(zip(header, rows[0]))["speed-up vs dense"], dict(zip(header, rows[0]))["verdict"]
    ('1.60x', 'faster')
"""

from __future__ import annotations

from typing import Any

from lightning_sparse.kernels.timing import DENSE, DENSE_CONV, SPARSE, SPARSE_CONV

__all__ = ["SPEEDUP_NOTE", "ratio", "table_rows", "verdict"]

SPEEDUP_NOTE = "speed-up = dense time / sparse time: > 1 is faster, < 1 slower"
_MAIN = {DENSE: SPARSE, DENSE_CONV: SPARSE_CONV}


def ratio(value: float | None) -> str:
    """``1.60x``, or ``-`` for no value."""
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def verdict(row: dict[str, Any]) -> str:
    """``faster`` / ``slower`` for a timed layer (its speed-up is in the column before), else why it was not
    converted or timed."""
    if row.get("reason"):
        return row["reason"]
    if row.get("faster") is None:
        errors = "; ".join(f"{name}: {error}" for name, error in (row.get("errors") or {}).items())
        return f"failed: {errors}" if errors else "failed"
    return "faster" if row["faster"] else "slower"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per layer of a :attr:`KernelBenchmark.results` dict."""
    main = set(_MAIN) | set(_MAIN.values())
    others = sorted({name for row in results["layers"] for name in row.get("speedups", {})} - main)
    header = ["layer", "type", "(out, in)", "input", "stored density", "dense (ms)", "sparse (ms)",
              "speed-up vs dense", "verdict", *(f"{name}: speed-up vs dense" for name in others)]
    rows = []
    for row in results["layers"]:
        times = row.get("times_ms", {})
        dense = next((name for name in _MAIN if name in times), None)
        stored = "" if row.get("stored_density") is None else f"{row['stored_density']:.3f}"
        size = str(row.get("tokens", "x".join(map(str, row.get("input_shape", [])))))
        rows.append([
            row["name"], row["type"], "x".join(map(str, row["matrix_shape"])), size, stored,
            _ms(times.get(dense)), _ms(times.get(_MAIN.get(dense))), ratio(row.get("speedup")), verdict(row),
            *(ratio(row.get("speedups", {}).get(name)) for name in others),
        ])
    return header, rows
