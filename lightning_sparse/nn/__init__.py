"""Inference modules that run exported sparse weights (BSR, 2:4), with kernel dispatch."""

from lightning_sparse.nn.convert import to_sparse_inference
from lightning_sparse.nn.sparse_conv import SparseConv2d
from lightning_sparse.nn.sparse_linear import SparseLinear

__all__ = ["SparseConv2d", "SparseLinear", "to_sparse_inference"]
