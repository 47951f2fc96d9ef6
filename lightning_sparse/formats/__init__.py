"""Storage formats for exported weights: dense-with-zeros <-> BSR and 2:4 (pure torch, CPU-testable)."""

from lightning_sparse.formats.bsr import (
    BSRWeight,
    bsr_from_torch,
    bsr_to_dense,
    bsr_to_torch,
    check_bsr,
    dense_to_bsr,
    parse_blocksize,
    split_bsr_blocks,
)
from lightning_sparse.formats.semi_structured import (
    Sparse24Weight,
    dense_to_sparse24,
    pack_sparse24_indices,
    sparse24_to_dense,
    to_torch_semi_structured,
    unpack_sparse24_indices,
)

__all__ = [
    "BSRWeight",
    "Sparse24Weight",
    "bsr_from_torch",
    "bsr_to_dense",
    "bsr_to_torch",
    "check_bsr",
    "dense_to_bsr",
    "dense_to_sparse24",
    "pack_sparse24_indices",
    "parse_blocksize",
    "sparse24_to_dense",
    "split_bsr_blocks",
    "to_torch_semi_structured",
    "unpack_sparse24_indices",
]
