"""Block sparse row (BSR) storage for 2-D weights: dense-with-zeros <-> ``(crow, col, values)``.

A weight ``W`` of shape ``(N, K)`` cut into ``R x C`` blocks is a grid of ``N/R`` block-rows by ``K/C``
block-columns. A block is stored when it holds any non-zero. For block-row ``r`` the stored blocks are
``values[crow[r]:crow[r + 1]]`` (shape ``(R, C)`` each, in increasing block-column order) and their
block-columns are ``col[crow[r]:crow[r + 1]]``. This is the layout of torch's ``torch.sparse_bsr``
tensors, so :func:`bsr_to_torch` and :func:`bsr_from_torch` only re-wrap the same three tensors.
"""

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BSRWeight",
    "bsr_from_torch",
    "bsr_to_dense",
    "bsr_to_torch",
    "check_bsr",
    "dense_to_bsr",
    "parse_blocksize",
    "split_bsr_blocks",
]


class BSRWeight(NamedTuple):
    """A BSR weight: the three component tensors and the dense shape ``(N, K)``.

    Args:
        crow_indices: ``(N/R + 1,)`` int64, offsets of each block-row's blocks in ``values``.
        col_indices: ``(nnzb,)`` int64, block-column of each stored block.
        values: ``(nnzb, R, C)`` stored blocks, in the weight's dtype.
        shape: dense shape ``(N, K)``.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    shape: tuple[int, int]

    @property
    def blocksize(self) -> tuple[int, int]:
        """The block shape ``(R, C)``."""
        return (self.values.shape[1], self.values.shape[2])

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the dense weight covered by stored blocks (1.0 for an empty shape)."""
        numel = self.shape[0] * self.shape[1]
        return self.values.numel() / numel if numel else 1.0

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BSRWeight":
        """Moves the tensors to ``device`` and casts ``values`` to ``dtype`` (indices keep their dtype)."""
        return BSRWeight(
            self.crow_indices.to(device),
            self.col_indices.to(device),
            self.values.to(device=device, dtype=dtype),
            self.shape,
        )


def parse_blocksize(blocksize: int | tuple[int, int] | str) -> tuple[int, int]:
    """Normalizes a block shape given as an int (square), a pair ``(R, C)`` or a string ``"RxC"``.

    Raises:
        ValueError: if the block shape is not two positive ints.

    Example::

        >>> parse_blocksize(32), parse_blocksize("16x32"), parse_blocksize((64, 16))
        ((32, 32), (16, 32), (64, 16))
    """
    pair: tuple = ()
    if isinstance(blocksize, str):
        parts = blocksize.lower().split("x")
        pair = tuple(int(p) for p in parts) if all(p.strip().isdigit() for p in parts) else ()
    elif isinstance(blocksize, int):
        pair = (blocksize, blocksize)
    elif isinstance(blocksize, tuple | list):
        pair = tuple(blocksize)
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in pair):
        raise ValueError(f'blocksize must be a positive int, a pair (R, C) of ints or "RxC"; got {blocksize!r}')
    return pair


def dense_to_bsr(weight: Tensor, blocksize: int | tuple[int, int] | str) -> BSRWeight:
    """Compresses a dense-with-zeros 2-D weight into BSR, keeping every block with any non-zero.

    Args:
        weight: ``(N, K)`` dense weight whose pruned entries are zero.
        blocksize: block shape ``(R, C)`` (or one int for square blocks, or ``"RxC"``); ``R`` must divide ``N`` and
            ``C`` must divide ``K``.

    Returns:
        The :class:`BSRWeight`; :func:`bsr_to_dense` gives back ``weight`` exactly.

    Raises:
        ValueError: if ``weight`` is not 2-D, or ``blocksize`` is not positive or does not divide its shape.

    Example::

        >>> w = torch.zeros(4, 4); w[2:, :2] = 1.0
        >>> bsr = dense_to_bsr(w, (2, 2))
        >>> bsr.crow_indices.tolist(), bsr.col_indices.tolist(), bsr.nnzb
        ([0, 0, 1], [0], 1)
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    r, c = parse_blocksize(blocksize)
    n, k = weight.shape
    if n % r or k % c:
        raise ValueError(
            f"blocksize ({r}, {c}) must divide the weight shape ({n}, {k}): rows by {r} and columns by {c}"
        )
    blocks = weight.reshape(n // r, r, k // c, c).transpose(1, 2)  # (N/R, K/C, R, C)
    keep = (blocks != 0).any(dim=-1).any(dim=-1)
    crow = torch.zeros(n // r + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(keep.sum(dim=1), dim=0, out=crow[1:])
    col = keep.nonzero()[:, 1].contiguous()
    return BSRWeight(crow, col, blocks[keep].contiguous(), (n, k))


def check_bsr(weight: BSRWeight) -> None:
    """Checks that the components of a :class:`BSRWeight` agree with each other and with its shape.

    Raises:
        ValueError: naming the component whose shape disagrees.
    """
    crow, col, values, shape = weight
    if values.dim() != 3:
        raise ValueError(f"BSR values must be 3-D (nnzb, R, C), got shape {tuple(values.shape)}")
    n, k = shape
    r, c = weight.blocksize
    if r == 0 or c == 0 or n % r or k % c:
        raise ValueError(f"BSR blocksize ({r}, {c}) must divide the weight shape ({n}, {k})")
    if crow.dim() != 1 or crow.numel() != n // r + 1:
        raise ValueError(f"BSR crow_indices must have shape ({n // r + 1},) for shape {shape}, got {tuple(crow.shape)}")
    if col.dim() != 1 or col.numel() != values.shape[0]:
        raise ValueError(f"BSR col_indices must have shape ({values.shape[0]},), got {tuple(col.shape)}")


def bsr_to_dense(weight: BSRWeight) -> Tensor:
    """Expands a :class:`BSRWeight` to its dense ``(N, K)`` tensor (zeros outside stored blocks)."""
    check_bsr(weight)
    crow, col, values, (n, k) = weight
    r, c = weight.blocksize
    blocks = values.new_zeros(n // r, k // c, r, c)
    rows = torch.repeat_interleave(torch.arange(n // r, device=crow.device), crow.diff())
    blocks[rows, col] = values
    return blocks.transpose(1, 2).reshape(n, k)


def split_bsr_blocks(weight: BSRWeight, blocksize: int | tuple[int, int] | str) -> BSRWeight:
    """Re-expresses a BSR weight with smaller blocks that divide its own (e.g. 16x32 -> 16x16).

    Every stored block becomes ``(R/r) x (C/c)`` stored sub-blocks, all-zero ones included, so the dense weight
    is unchanged. torch's CPU BSR matmul (MKL) takes square blocks only; this gives it ``gcd(R, C)`` squares.

    Raises:
        ValueError: if ``blocksize`` does not divide the weight's block shape.

    Example::

        >>> w = torch.zeros(2, 4); w[0, 3] = 1.0
        >>> split = split_bsr_blocks(dense_to_bsr(w, (2, 4)), 2)
        >>> split.crow_indices.tolist(), split.col_indices.tolist(), torch.equal(bsr_to_dense(split), w)
        ([0, 2], [0, 1], True)
    """
    check_bsr(weight)
    r, c = parse_blocksize(blocksize)
    big_r, big_c = weight.blocksize
    if big_r % r or big_c % c:
        raise ValueError(f"blocksize ({r}, {c}) must divide the BSR blocksize ({big_r}, {big_c})")
    a, b = big_r // r, big_c // c
    crow, col, values, shape = weight
    nnzb = values.shape[0]
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    sub_rows = (rows[:, None] * a + torch.arange(a, device=crow.device)).flatten()  # per (block, sub-row)
    sub_cols = (col[:, None] * b + torch.arange(b, device=crow.device)).repeat_interleave(a, dim=0)
    order = torch.argsort(sub_rows, stable=True)  # by sub-row, then by block (already in column order)
    sub_values = values.reshape(nnzb, a, r, b, c).transpose(2, 3).reshape(nnzb * a, b, r, c)
    new_crow = torch.zeros(crow.numel() * a - a + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(crow.diff().repeat_interleave(a) * b, dim=0, out=new_crow[1:])
    return BSRWeight(new_crow, sub_cols[order].flatten(), sub_values[order].reshape(-1, r, c), shape)


def bsr_to_torch(weight: BSRWeight, check_invariants: bool = False) -> Tensor:
    """Wraps a :class:`BSRWeight` as a ``torch.sparse_bsr`` tensor (shares the component tensors).

    Args:
        weight: the BSR weight; its component shapes are always checked.
        check_invariants: also let torch check the index contents (sorted, in range); off by default because
            it costs a pass over the indices and weights made by :func:`dense_to_bsr` satisfy them.
    """
    check_bsr(weight)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(
            weight.crow_indices,
            weight.col_indices,
            weight.values,
            size=weight.shape,
            dtype=weight.values.dtype,
            check_invariants=check_invariants,
        )


def bsr_from_torch(tensor: Tensor) -> BSRWeight:
    """Unwraps a 2-D ``torch.sparse_bsr`` tensor into a :class:`BSRWeight`.

    Raises:
        ValueError: if ``tensor`` is not a 2-D tensor with layout ``torch.sparse_bsr``.
    """
    if tensor.layout != torch.sparse_bsr or tensor.dim() != 2:
        raise ValueError(
            f"tensor must be a 2-D torch.sparse_bsr tensor, got layout {tensor.layout} and shape {tuple(tensor.shape)}"
        )
    n, k = tensor.shape
    return BSRWeight(tensor.crow_indices(), tensor.col_indices(), tensor.values(), (n, k))
