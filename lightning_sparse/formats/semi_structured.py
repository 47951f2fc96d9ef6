"""2:4 semi-structured storage: dense-with-zeros ``(N, K)`` <-> kept values ``(N, K/2)`` + packed 2-bit indices.

Along the input dim ``K`` every group of 4 consecutive entries keeps (at most) 2 non-zeros.

Layout (the CUTLASS nibble codes, without CUTLASS's interleaved reordering of the metadata):

- ``values[n, 2g + j]`` (``j`` in ``{0, 1}``) is the ``j``-th kept entry of group ``g`` of row ``n``, kept
  entries in increasing column order. A group with fewer than 2 non-zeros is padded with zeros at its
  lowest free positions, so the two indices of a group always differ.
- The 2-bit position ``i_j`` (0..3 inside the group) of each kept entry is packed as one nibble per group,
  ``code = i_0 | (i_1 << 2)``, and 4 consecutive groups share one ``int16`` word:
  ``packed_idx[n, w] = sum_t code[n, 4w + t] << (4t)`` (bit pattern; the word may read as negative).
  ``packed_idx`` has shape ``(N, ceil(K/16))``; nibbles past the last group are zero.

So dense column ``k`` of row ``n`` is ``values[n, 2(k//4) + j]`` when nibble ``k//4`` holds ``k % 4`` in
slot ``j``, and zero otherwise. Bytes per dense element: ``s/2 + 1/8`` for ``s`` bytes per value.
"""

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Sparse24Weight",
    "dense_to_sparse24",
    "pack_sparse24_indices",
    "sparse24_to_dense",
    "to_torch_semi_structured",
    "unpack_sparse24_indices",
]


class Sparse24Weight(NamedTuple):
    """A 2:4-compressed weight.

    Args:
        values: ``(N, K/2)`` kept values in the weight's dtype.
        packed_idx: ``(N, ceil(K/16))`` int16, 4 groups' index nibbles per word (see the module docstring).
        shape: dense shape ``(N, K)``.
    """

    values: Tensor
    packed_idx: Tensor
    shape: tuple[int, int]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Sparse24Weight":
        """Moves the tensors to ``device`` and casts ``values`` to ``dtype`` (indices stay int16)."""
        return Sparse24Weight(self.values.to(device=device, dtype=dtype), self.packed_idx.to(device), self.shape)


def pack_sparse24_indices(idx: Tensor) -> Tensor:
    """Packs ``(N, G, 2)`` in-group positions (0..3) into ``(N, ceil(G/4))`` int16 words."""
    n, groups, _ = idx.shape
    codes = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int32)
    pad = -groups % 4
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(n, -1, 4)
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=idx.device)
    words = (codes << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)


def unpack_sparse24_indices(packed_idx: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`pack_sparse24_indices`: ``(N, W)`` int16 words -> ``(N, groups, 2)`` int64 positions."""
    words = packed_idx.to(torch.int64) & 0xFFFF
    shifts = torch.arange(0, 16, 2, device=packed_idx.device)
    pos = (words[..., None] >> shifts) & 3  # (N, W, 8): per word 4 groups x 2 slots
    return pos.reshape(packed_idx.shape[0], -1, 2)[:, :groups]


def dense_to_sparse24(weight: Tensor) -> Sparse24Weight:
    """Compresses a dense-with-zeros 2:4 weight along its input dim ``K``.

    Args:
        weight: ``(N, K)`` with ``K`` divisible by 4 and at most 2 non-zeros in every group of 4 columns.

    Returns:
        The :class:`Sparse24Weight`; :func:`sparse24_to_dense` gives back ``weight`` exactly.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``K`` is not divisible by 4, or a group holds more than 2
            non-zeros (the first such group is named by its row and column range).

    Example::

        >>> w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
        >>> sp = dense_to_sparse24(w)
        >>> sp.values.tolist(), unpack_sparse24_indices(sp.packed_idx, 1).tolist()
        ([[1.0, 2.0], [3.0, 0.0]], [[[1, 3]], [[0, 1]]])
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 compression needs the input dim K divisible by 4, got weight shape ({n}, {k})")
    groups = weight.reshape(n, k // 4, 4)
    nonzero = groups != 0
    bad = (nonzero.sum(dim=-1) > 2).nonzero()
    if len(bad):
        row, g = bad[0].tolist()
        raise ValueError(
            f"weight of shape ({n}, {k}) is not 2:4 sparse: row {row}, columns {4 * g}..{4 * g + 3} hold "
            f"{int(nonzero[row, g].sum())} non-zeros (at most 2 allowed per group of 4)"
        )
    # Non-zeros first, then the lowest zero positions as padding; the kept pair in column order.
    order = torch.argsort(nonzero.to(torch.int8), dim=-1, descending=True, stable=True)
    idx = order[..., :2].sort(dim=-1).values
    values = torch.gather(groups, -1, idx).reshape(n, k // 2)
    return Sparse24Weight(values.contiguous(), pack_sparse24_indices(idx), (n, k))


def sparse24_to_dense(weight: Sparse24Weight) -> Tensor:
    """Expands a :class:`Sparse24Weight` to its dense ``(N, K)`` tensor."""
    values, packed_idx, (n, k) = weight
    idx = unpack_sparse24_indices(packed_idx, k // 4)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def to_torch_semi_structured(weight: Tensor) -> Tensor:
    """Converts a dense-with-zeros 2:4 CUDA weight to torch's ``SparseSemiStructuredTensor`` (cuSPARSELt/CUTLASS).

    torch's own compressed layouts are opaque or reordered, so this starts from the dense weight
    (``sparse24_to_dense`` gives it back from our format). torch adds its own shape constraints.

    Raises:
        ValueError: if ``weight`` is not on a CUDA device (torch's semi-structured kernels are CUDA only).
    """
    if weight.device.type != "cuda":
        raise ValueError(f"to_torch_semi_structured() needs a CUDA weight, got device {weight.device}")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)
