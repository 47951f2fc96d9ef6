"""lightning_sparse: sparse training for PyTorch Lightning."""

from lightning_sparse.masking import MaskState
from lightning_sparse.mixins import SparseModuleMixin
from lightning_sparse.report import SparsityReport, sparsity_report

__version__ = "0.1.0"

__all__ = ["MaskState", "SparseModuleMixin", "SparsityReport", "__version__", "sparsity_report"]
