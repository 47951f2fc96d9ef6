"""lightning_sparse: sparse training for PyTorch Lightning."""

from lightning_sparse.callbacks.sparsegpt import sparsegpt_
from lightning_sparse.core.soft_topk import soft_topk
from lightning_sparse.export import export_sparse, load_sparse
from lightning_sparse.masking import MaskState
from lightning_sparse.mixins import SparseModuleMixin
from lightning_sparse.nn import SparseConv2d, SparseLinear, to_sparse_inference
from lightning_sparse.report import SparsityReport, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "MaskState",
    "SparseConv2d",
    "SparseLinear",
    "SparseModuleMixin",
    "SparsityReport",
    "__version__",
    "export_sparse",
    "load_sparse",
    "soft_topk",
    "sparsegpt_",
    "sparsity_report",
    "to_sparse_inference",
]
