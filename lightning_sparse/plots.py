"""Figures for people who would rather look than read: per-layer density (the SparsityMonitor's chart) and test
accuracy against density (``benchmarks/quality.py``). matplotlib is imported only when a figure is drawn (it is in
the ``dev`` extra, not a dependency), with the Agg backend, so no display is needed.

Example::

    >>> figure = density_figure([{"name": "fc1.weight", "density": 0.1, "target": 0.1},
    ...                          {"name": "fc2.weight", "density": 0.3, "target": None}])
    >>> [float(bar.get_width()) for bar in figure.axes[0].patches]
    [0.1, 0.3]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["accuracy_figure", "density_figure", "pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        ImportError: when matplotlib is not installed, saying how to install it.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError('the figures need matplotlib: pip install matplotlib (or "lightning-sparse[dev]")') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_figure(rows: Sequence[Mapping[str, Any]], title: str = "density per layer") -> Any:
    """A horizontal bar per layer (``rows`` of a :class:`~lightning_sparse.report.SparsityReport`: ``name``,
    ``density`` and ``target``, None when there is none), the target as a black tick; returns the Figure."""
    plt = pyplot()
    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    axes.barh(range(len(rows)), [row["density"] for row in rows], color="tab:blue", label="density")
    targets = [(i, row["target"]) for i, row in enumerate(rows) if row.get("target") is not None]
    if targets:
        axes.scatter([t for _, t in targets], [i for i, _ in targets], marker="|", s=200, color="black",
                     label="target", zorder=3)
    axes.set_yticks(range(len(rows)), names)
    axes.invert_yaxis()  # the first layer on top
    axes.set_xlim(0, 1)
    axes.set_xlabel("density (fraction of weights kept)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def accuracy_figure(accuracy: Mapping[str, Mapping[float, float]], dense: float, path: str | Path | None = None,
                    title: str = "test accuracy vs density") -> Any:
    """One line per method (``accuracy[method][density]``) against density on a log axis, dense as a dashed
    reference line; written to ``path`` (PNG) when given. Returns the Figure.

    Raises:
        ValueError: when ``accuracy`` is empty.
    """
    if not accuracy:
        raise ValueError("accuracy must hold at least one method, got {}")
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab10").colors
    for index, (method, points) in enumerate(accuracy.items()):
        densities = sorted(points)
        style = "-" if index < len(colors) else ":"  # past ten methods the colors repeat, dotted
        axes.plot(densities, [points[d] for d in densities], marker="o", linestyle=style,
                  color=colors[index % len(colors)], label=method)
    axes.axhline(dense, color="black", linestyle="--", label=f"dense ({dense:.4f})")
    axes.set_xscale("log")
    axes.minorticks_off()
    every = sorted({d for points in accuracy.values() for d in points})
    axes.set_xticks(every, [f"{d:g}" for d in every])
    axes.set_xlabel("density (fraction of weights kept, log scale)")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure
