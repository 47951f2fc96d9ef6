"""``SparsityReport``: per-layer density of a model as a table.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 2, bias=False)
    >>> with torch.no_grad():
    ...     model.weight[0] = 0
    >>> report = sparsity_report(model)
    >>> report.rows[0]["density"], report.global_density
    (0.5, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_sparse.targets import default_targets


@dataclass
class SparsityReport:
    """Rows of ``{"name", "shape", "numel", "nonzero", "density", "target"}`` plus the global density. A row may also
    hold ``"asked"``: the final density asked of a layer whose run ended before its schedule did (a column of its
    own when any row has one)."""

    rows: list[dict] = field(default_factory=list)

    @property
    def global_density(self) -> float:
        """Non-zeros over elements, all rows together."""
        total = sum(row["numel"] for row in self.rows)
        return sum(row["nonzero"] for row in self.rows) / total if total else 1.0

    def __str__(self) -> str:
        asked = any(row.get("asked") is not None for row in self.rows)
        header = ("parameter", "shape", "nonzero", "density", "target") + (("asked",) if asked else ())
        lines = [
            (row["name"], "x".join(map(str, row["shape"])), f"{row['nonzero']}/{row['numel']}", f"{row['density']:.4f}",
             _cell(row["target"])) + ((_cell(row.get("asked")),) if asked else ())
            for row in self.rows
        ]
        total = sum(row["numel"] for row in self.rows)
        nonzero = sum(row["nonzero"] for row in self.rows)
        lines.append(("total", "", f"{nonzero}/{total}", f"{self.global_density:.4f}", "") + (("",) if asked else ()))
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
        render = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                  for line in (header, *lines)]
        return "\n".join(render)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@torch.no_grad()
def sparsity_report(
    model: nn.Module, names: Sequence[str] | None = None, targets: Mapping[str, float] | None = None
) -> SparsityReport:
    """Per-parameter density (non-zero fraction) of ``names`` (default: the default sparse targets)."""
    params = dict(model.named_parameters())
    names = list(names) if names is not None else default_targets(model)
    targets = targets or {}
    rows = []
    for name in names:
        param = params[name]
        nonzero = int(torch.count_nonzero(param))
        rows.append({"name": name, "shape": tuple(param.shape), "numel": param.numel(), "nonzero": nonzero,
                     "density": nonzero / param.numel(), "target": targets.get(name)})
    return SparsityReport(rows)
