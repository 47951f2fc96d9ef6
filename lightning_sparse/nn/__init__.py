"""Inference modules that run exported sparse weights (BSR, 2:4), with kernel dispatch, and the conversion of
a dense-with-zeros model (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv2d``) to them."""

from lightning_sparse.nn.convert import inference_plan, to_sparse_inference
from lightning_sparse.nn.sparse_conv import SparseConv2d
from lightning_sparse.nn.sparse_linear import SparseLinear

__all__ = ["SparseConv2d", "SparseLinear", "inference_plan", "to_sparse_inference"]
