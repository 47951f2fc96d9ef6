"""``SparseLinear``: an inference-only linear layer holding an exported BSR or 2:4 weight."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sparse.formats.bsr import (
    BSRWeight,
    bsr_to_dense,
    bsr_to_torch,
    dense_to_bsr,
    parse_blocksize,
    split_bsr_blocks,
)
from lightning_sparse.formats.semi_structured import Sparse24Weight, dense_to_sparse24, sparse24_to_dense
from lightning_sparse.kernels import bsr_linear, has_triton, sparse24_linear
from lightning_sparse.nn.eligible import linear_kind

__all__ = ["SparseLinear"]

_FORMATS = ("bsr", "2:4")
_BACKENDS = ("auto", "triton", "torch")


_GATHER_ELEMENTS = 1 << 22  # activations gathered per chunk of tokens (16 MiB in fp32)
GATHER_MAX_ELEMENTS = 1 << 22  # CPU: block gather while tokens * blocks * C stays below this, MKL's BSR matmul above


def _mkl_bsr_matmul(x: Tensor, weight: BSRWeight, dtype: torch.dtype) -> Tensor:
    """``(W @ x^T)^T`` with torch's sparse BSR tensor (MKL on CPU; square blocks only, so others are split)."""
    r, c = weight.blocksize
    if r != c:
        weight = split_bsr_blocks(weight, math.gcd(r, c))
    return (bsr_to_torch(weight.to(dtype=dtype)) @ x.T.contiguous()).T.contiguous()


def _gather_bsr_matmul(x: Tensor, weight: BSRWeight, dtype: torch.dtype) -> Tensor:
    """``x @ W^T`` on the CPU: gather the input slice of every stored block, one batched matmul, add rows up.

    About 2x faster than dense at 10% of 32x32 blocks and 128 tokens, where torch's own CPU BSR paths (MKL) are
    at best even with dense. Tokens are processed in chunks so the gathered activations stay small.
    """
    (n, k), (r, c) = weight.shape, weight.blocksize
    values = weight.values.to(dtype).transpose(1, 2)  # (nnzb, C, R)
    rows = torch.repeat_interleave(torch.arange(n // r, device=x.device), weight.crow_indices.diff())
    y = x.new_zeros(x.shape[0], n // r, r)
    chunk = max(1, _GATHER_ELEMENTS // max(1, values.shape[0] * c))
    for start in range(0, x.shape[0], chunk):
        blocks = x[start : start + chunk].reshape(-1, k // c, c)[:, weight.col_indices].transpose(0, 1)
        y[start : start + chunk].index_add_(1, rows, torch.bmm(blocks, values).transpose(0, 1))
    return y.reshape(x.shape[0], n)


def adopt_block_count(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Resizes ``module``'s ``col_indices`` and ``values`` buffers to the incoming BSR state's block count (which is
    data-dependent), so ``load_state_dict`` accepts a state with another number of stored blocks."""
    for name in ("col_indices", "values"):
        incoming = state_dict.get(prefix + name)
        if isinstance(incoming, Tensor) and incoming.shape != module._buffers[name].shape:
            module._buffers[name] = module._buffers[name].new_empty(incoming.shape)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as BSR blocks or 2:4-compressed; built with :meth:`from_dense`.

    Which path runs (``backend="auto"``):

    - CUDA input and triton installed: our Triton kernels, :func:`~lightning_sparse.kernels.bsr_linear` or
      :func:`~lightning_sparse.kernels.sparse24_linear`.
    - otherwise, format ``"bsr"``: on CUDA, torch's ``F.linear`` with a ``torch.sparse_bsr`` weight. On CPU, while
      the gathered activations (tokens x stored blocks x C) stay under ``GATHER_MAX_ELEMENTS``, a block gather (the
      input slice of every stored block is gathered, multiplied in one batched matmul and added into its block
      row; 2.6x dense for the SmallCNN's 10%-dense 128x3136 layer at 128 tokens), above it torch's MKL BSR matmul
      ``(W @ x^T)^T`` (non-square blocks split into squares); fp16/bf16 compute in fp32 and cast back. Both beat
      ``F.linear`` with a BSR weight, which is slower than dense on CPU (``benchmarks/kernels.py``).
    - otherwise, format ``"2:4"``: a dense ``F.linear`` with the decompressed weight.

    ``backend="triton"`` forces the kernels (on CPU they then need ``TRITON_INTERPRET=1``), ``backend="torch"``
    forces the torch paths. The weight and bias are buffers (inference only, no gradients); ``.to()`` moves and
    casts them like any module, and :meth:`load_state_dict` accepts a BSR state with a different block count.

    Args:
        in_features: ``K``.
        out_features: ``N``.
        format: ``"bsr"`` or ``"2:4"``.
        blocksize: BSR block shape ``(R, C)``, an int or ``"RxC"``; ignored for ``"2:4"``.
        bias: whether the layer has a bias.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        device: device of the (empty) buffers.
        dtype: dtype of the values and bias buffers.

    Raises:
        ValueError: on an unknown ``format`` or ``backend``, or features not divisible by the block (BSR) or by 4 (2:4).

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     _ = lin.weight[:, 16:].zero_()
        >>> sparse = SparseLinear.from_dense(lin, format="bsr", blocksize=16)
        >>> x = torch.randn(5, 64)
        >>> torch.allclose(sparse(x), lin(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        format: str = "bsr",
        blocksize: int | tuple[int, int] | str = (32, 32),
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.backend = backend  # validated by the setter
        kw = {"device": device}
        if format == "bsr":
            self.blocksize = parse_blocksize(blocksize)
            r, c = self.blocksize
            if out_features % r or in_features % c:
                raise ValueError(
                    f"blocksize {self.blocksize} must divide the weight shape ({out_features}, {in_features})"
                )
            self.register_buffer("crow_indices", torch.zeros(out_features // r + 1, dtype=torch.int64, **kw))
            self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, **kw))
            self.register_buffer("values", torch.zeros(0, r, c, dtype=dtype, **kw))
        else:
            if in_features % 4:
                raise ValueError(f"2:4 needs in_features divisible by 4, got in_features={in_features}")
            self.blocksize = None
            self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, **kw))
            self.register_buffer(
                "packed_idx", torch.zeros(out_features, -(-in_features // 16), dtype=torch.int16, **kw)
            )
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @property
    def backend(self) -> str:
        """Which implementation :meth:`forward` uses: ``"auto"``, ``"triton"`` or ``"torch"``."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {value!r}")
        self._backend = value

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Module | Tensor,
        bias: Tensor | None = None,
        format: str = "bsr",
        blocksize: int | tuple[int, int] | str = (32, 32),
        backend: str = "auto",
    ) -> "SparseLinear":
        """Builds the layer from a dense-with-zeros linear layer or ``(N, K)`` weight (plus optional bias).

        A linear layer is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2), whose ``(in, out)`` weight is
        stored transposed, as its ``(out, in)`` view: the sparse layer computes the same function.
        The stored weight is exact: BSR keeps every block with a non-zero; 2:4 requires a 2:4 weight.

        Args:
            linear_or_weight: an ``nn.Linear`` or HF ``Conv1D`` (its bias is used unless ``bias`` is given) or a
                2-D ``(out, in)`` weight tensor.
            bias: optional ``(N,)`` bias.
            format: ``"bsr"`` or ``"2:4"``.
            blocksize: BSR block shape (int, ``(R, C)`` or ``"RxC"``).
            backend: see the class docstring.

        Raises:
            TypeError: if ``linear_or_weight`` is neither a linear layer nor a tensor.
            ValueError: as :class:`SparseLinear`, or from the format conversion (shape not divisible, not 2:4).
        """
        kind = linear_kind(linear_or_weight) if isinstance(linear_or_weight, nn.Module) else None
        if kind is not None:
            weight = kind.as_matrix(linear_or_weight.weight)
            bias = linear_or_weight.bias if bias is None else bias
        elif isinstance(linear_or_weight, Tensor):
            weight = linear_or_weight
        else:
            raise TypeError(
                "linear_or_weight must be an nn.Linear, a Hugging Face Conv1D or a Tensor, got "
                f"{type(linear_or_weight).__name__}"
            )
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        module = cls(
            in_features, out_features, format, blocksize, bias is not None, backend, weight.device, weight.dtype
        )
        if format == "bsr":
            crow, col, values, _ = dense_to_bsr(weight, module.blocksize)
            module.crow_indices, module.col_indices, module.values = crow, col, values
        else:
            module.values, module.packed_idx, _ = dense_to_sparse24(weight)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def sparse_weight(self) -> BSRWeight | Sparse24Weight:
        """The stored weight as a :class:`BSRWeight` or :class:`Sparse24Weight` (shares the buffers)."""
        shape = (self.out_features, self.in_features)
        if self.format == "bsr":
            return BSRWeight(self.crow_indices, self.col_indices, self.values, shape)
        return Sparse24Weight(self.values, self.packed_idx, shape)

    def to_dense(self) -> Tensor:
        """The dense-with-zeros ``(out_features, in_features)`` weight."""
        weight = self.sparse_weight()
        return bsr_to_dense(weight) if self.format == "bsr" else sparse24_to_dense(weight)

    @property
    def density(self) -> float:
        """Stored fraction of the dense weight: kept blocks for BSR, 0.5 for 2:4."""
        return self.sparse_weight().density if self.format == "bsr" else 0.5

    def forward(self, x: Tensor) -> Tensor:
        """Computes ``x W^T + b`` with the path described in the class docstring."""
        use_triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda and has_triton())
        weight = self.sparse_weight()
        if use_triton:
            kernel = bsr_linear if self.format == "bsr" else sparse24_linear
            return kernel(x, weight, self.bias)
        if self.format == "2:4":
            return F.linear(x, sparse24_to_dense(weight), self.bias)
        return self._torch_bsr_linear(x, weight)

    def _torch_bsr_linear(self, x: Tensor, weight: BSRWeight) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # torch's BSR F.linear rejects some strided N-D inputs
        if x.device.type != "cpu":  # torch's dispatch (its Triton BSR kernel on CUDA when it applies)
            y = F.linear(x2, bsr_to_torch(weight), self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        if x2.shape[0] * weight.values.shape[0] * weight.blocksize[1] <= GATHER_MAX_ELEMENTS:
            y = _gather_bsr_matmul(x2.to(dtype), weight, dtype)
        else:
            y = _mkl_bsr_matmul(x2.to(dtype), weight, dtype)
        if self.bias is not None:
            y += self.bias.to(dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.format == "bsr":
            adopt_block_count(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.format == "bsr" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}{block}, "
            f"bias={self.bias is not None}, density={self.density:.3f}, backend={self.backend!r}"
        )
