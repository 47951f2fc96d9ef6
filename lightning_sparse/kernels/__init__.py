"""Triton kernels for exported sparse weights, with pure-torch references.

Importing this package never imports triton (the kernels are imported on their first launch) and never needs
a GPU; calling a kernel without triton raises a RuntimeError.
"""

from lightning_sparse.kernels._support import has_triton
from lightning_sparse.kernels.bsr_matmul import bsr_linear
from lightning_sparse.kernels.reference import bsr_linear_reference, sparse24_linear_reference
from lightning_sparse.kernels.sparse24_matmul import sparse24_linear

__all__ = ["bsr_linear", "bsr_linear_reference", "has_triton", "sparse24_linear", "sparse24_linear_reference"]
