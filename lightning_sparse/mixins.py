"""``SparseModuleMixin``: the override points a LightningModule offers to every sparsity callback.

Example::

    >>> import lightning.pytorch as pl
    >>> from torch import nn
    >>> class Net(SparseModuleMixin, pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Linear(8, 8)
    ...         self.head = nn.Linear(8, 2)
    ...     def sparse_targets(self):
    ...         return {"body.weight": None, "head.weight": 0.5}  # body: the callback's density; head: 50%
    >>> print(Net().sparsity_report())
    parameter    shape  nonzero  density  target
    body.weight  8x8    64/64    1.0000
    head.weight  2x8    16/16    1.0000   0.5000
    total               80/80    1.0000
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_sparse.report import SparsityReport, sparsity_report


class SparseModuleMixin:
    """Mix into a ``LightningModule`` to declare which parameters are sparse and to report their density."""

    def sparse_targets(self) -> Mapping[str, float | None] | Sequence[str] | None:
        """Parameters to sparsify, honoured by every sparsity callback.

        Returns:
            ``None`` to let each callback's ``include``/``exclude`` decide; a list of name globs; or a dict from
            name glob to a per-layer density (``None``: the callback's density). A callback given both this and
            its own ``include`` raises ``ValueError``.
        """
        return None

    def sparsity_report(self) -> SparsityReport:
        """Per-layer density (non-zero fraction) of the declared targets, or of the default targets."""
        declared = self.sparse_targets()
        if declared is None:
            return sparsity_report(self)
        from lightning_sparse.targets import select_targets

        names = select_targets(self, list(declared))
        overrides = {}
        if isinstance(declared, Mapping):
            for glob, density in declared.items():
                if density is not None:
                    overrides.update(dict.fromkeys(select_targets(self, [glob]), density))
        return sparsity_report(self, names, overrides)
