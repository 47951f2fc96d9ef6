"""Pure-torch references of every kernel: ``y = x W^T + b`` with fp32 accumulation, any leading batch dims of ``x``.

They are written from the storage definitions, not from the kernels, so the tests compare two independent
computations. They also serve as the slow fallback on devices without a kernel.
"""

import torch
from torch import Tensor

from lightning_sparse.formats.semi_structured import unpack_sparse24_indices

__all__ = ["bsr_linear_reference", "sparse24_linear_reference"]


def _finish(y: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def bsr_linear_reference(
    x: Tensor, crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int], bias: Tensor | None = None
) -> Tensor:
    """``x @ W.T + bias`` for a BSR ``W`` given by its components, block by block in fp32.

    Args:
        x: ``(..., K)`` activations.
        crow: ``(N/R + 1,)`` block-row offsets.
        col: ``(nnzb,)`` block-columns.
        values: ``(nnzb, R, C)`` blocks.
        shape: dense weight shape ``(N, K)``.
        bias: optional ``(N,)`` bias.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    n, k = shape
    _, r, c = values.shape
    x2 = x.reshape(-1, k).float()
    rows = torch.repeat_interleave(torch.arange(n // r, device=crow.device), crow.diff())
    x_blocks = x2.reshape(-1, k // c, c)[:, col]  # (M, nnzb, C): the x slice each block multiplies
    partial = torch.einsum("mbc,brc->mbr", x_blocks, values.float())  # (M, nnzb, R)
    y = x2.new_zeros(x2.shape[0], n // r, r).index_add_(1, rows, partial)
    return _finish(y.reshape(-1, n), bias, x)


def sparse24_linear_reference(x: Tensor, values: Tensor, packed_idx: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` for a 2:4-compressed ``W`` (``values`` ``(N, K/2)``, ``packed_idx`` int16), in fp32.

    Each kept value is placed at the column its 2-bit index points at inside its group of 4.

    Args:
        x: ``(..., K)`` activations with ``K = 2 * values.shape[1]``.
        values: ``(N, K/2)`` kept values.
        packed_idx: ``(N, ceil(K/16))`` packed indices (layout in :mod:`lightning_sparse.formats.semi_structured`).
        bias: optional ``(N,)`` bias.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    n, half = values.shape
    k = 2 * half
    idx = unpack_sparse24_indices(packed_idx, k // 4)  # (N, G, 2)
    cols = (idx + 4 * torch.arange(k // 4, device=idx.device)[:, None]).reshape(n, half)  # dense column of each value
    w = values.new_zeros(n, k, dtype=torch.float32).scatter_(1, cols, values.float())
    return _finish(x.reshape(-1, k).float() @ w.T, bias, x)
