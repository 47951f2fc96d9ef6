import pytest
import torch

from lightning_sparse.formats import (
    BSRWeight,
    bsr_from_torch,
    bsr_to_dense,
    bsr_to_torch,
    check_bsr,
    dense_to_bsr,
    parse_blocksize,
    split_bsr_blocks,
)


def block_sparse(n, k, r, c, density=0.4, empty_rows=(1,), dtype=torch.float32):
    """Random (n, k) weight: random kept blocks (block-rows in ``empty_rows`` empty), some zeros inside blocks."""
    keep = torch.rand(n // r, k // c) < density
    keep[list(empty_rows)] = False
    weight = torch.randn(n, k) * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    weight[torch.rand(n, k) < 0.3] = 0.0
    return weight.to(dtype)


@pytest.mark.parametrize(
    ("n", "k", "blocksize"),
    [(64, 96, (16, 32)), (64, 64, (32, 16)), (48, 64, (16, 16)), (32, 32, (8, 8)), (30, 20, (3, 5))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(n, k, blocksize, dtype):
    weight = block_sparse(n, k, *blocksize, dtype=dtype)
    bsr = dense_to_bsr(weight, blocksize)
    assert bsr.blocksize == blocksize and bsr.values.dtype == dtype
    assert torch.equal(bsr_to_dense(bsr), weight)
    assert torch.equal(bsr_to_dense(bsr_from_torch(bsr_to_torch(bsr))), weight)


def test_matches_torch_components():
    weight = block_sparse(64, 96, 16, 32)
    ours = dense_to_bsr(weight, (16, 32))
    theirs = weight.to_sparse_bsr((16, 32))
    assert torch.equal(ours.crow_indices, theirs.crow_indices())
    assert torch.equal(ours.col_indices, theirs.col_indices())
    assert torch.equal(ours.values, theirs.values())


def test_keeps_exactly_blocks_with_a_nonzero():
    weight = torch.zeros(8, 8)
    weight[5, 2] = 3.0  # block (2, 1) of 2x2 blocks
    weight[0, 7] = -1.0  # block (0, 3)
    bsr = dense_to_bsr(weight, 2)
    assert bsr.crow_indices.tolist() == [0, 1, 1, 2, 2]
    assert bsr.col_indices.tolist() == [3, 1]
    assert bsr.nnzb == 2 and bsr.density == 8 / 64
    assert torch.equal(bsr.values[1], torch.tensor([[0.0, 0.0], [3.0, 0.0]]))


def test_fully_empty_and_fully_dense():
    empty = dense_to_bsr(torch.zeros(32, 48), (16, 16))
    assert empty.nnzb == 0 and empty.values.shape == (0, 16, 16)
    assert empty.crow_indices.tolist() == [0, 0, 0]
    assert torch.equal(bsr_to_dense(empty), torch.zeros(32, 48))
    dense = torch.randn(32, 48)
    full = dense_to_bsr(dense, (16, 16))
    assert full.nnzb == 6 and full.density == 1.0
    assert torch.equal(bsr_to_dense(full), dense)


def test_to_casts_values_only():
    bsr = dense_to_bsr(block_sparse(32, 32, 16, 16), 16).to(dtype=torch.float16)
    assert bsr.values.dtype == torch.float16 and bsr.col_indices.dtype == torch.int64
    assert isinstance(bsr, BSRWeight) and bsr.shape == (32, 32)


@pytest.mark.parametrize(
    ("blocksize", "expected"), [(32, (32, 32)), ("16x64", (16, 64)), ((8, 4), (8, 4)), ([2, 2], (2, 2))]
)
def test_parse_blocksize(blocksize, expected):
    assert parse_blocksize(blocksize) == expected


@pytest.mark.parametrize("blocksize", [0, -2, (16,), (1, 2, 3), "axb", "32", "0x4", True, (16.0, 16), None])
def test_parse_blocksize_errors(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        parse_blocksize(blocksize)


def test_dense_to_bsr_errors():
    with pytest.raises(ValueError, match=r"weight must be 2-D \(N, K\), got shape \(4,\)"):
        dense_to_bsr(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"blocksize \(16, 16\) must divide the weight shape \(40, 64\)"):
        dense_to_bsr(torch.zeros(40, 64), 16)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        dense_to_bsr(torch.zeros(4, 4), 0)


def test_check_bsr_errors():
    crow, col, values, shape = dense_to_bsr(block_sparse(32, 32, 16, 16, density=1.0, empty_rows=()), 16)
    with pytest.raises(ValueError, match=r"values must be 3-D \(nnzb, R, C\), got shape \(4, 256\)"):
        check_bsr(BSRWeight(crow, col, values.reshape(4, 256), shape))
    with pytest.raises(ValueError, match=r"blocksize \(16, 16\) must divide the weight shape \(40, 32\)"):
        check_bsr(BSRWeight(crow, col, values, (40, 32)))
    with pytest.raises(ValueError, match=r"crow_indices must have shape \(3,\) for shape \(32, 32\), got \(4,\)"):
        check_bsr(BSRWeight(torch.zeros(4, dtype=torch.int64), col, values, shape))
    with pytest.raises(ValueError, match=r"col_indices must have shape \(4,\), got \(3,\)"):
        check_bsr(BSRWeight(crow, col[:3], values, shape))
    with pytest.raises(ValueError, match="values must be 3-D"):
        bsr_to_dense(BSRWeight(crow, col, values[0], shape))


def test_bsr_from_torch_errors():
    with pytest.raises(ValueError, match=r"2-D torch.sparse_bsr tensor, got layout torch.strided and shape \(4, 4\)"):
        bsr_from_torch(torch.zeros(4, 4))


def test_bsr_to_torch_can_check_invariants():
    crow, col, values, shape = dense_to_bsr(block_sparse(32, 32, 16, 16, density=1.0, empty_rows=()), 16)
    bad = BSRWeight(crow, torch.tensor([0, 5, 0, 1]), values, shape)  # block-column 5 is out of range
    with pytest.raises(RuntimeError, match="col_indices"):
        bsr_to_torch(bad, check_invariants=True)


@pytest.mark.parametrize(("blocksize", "sub"), [((16, 32), (16, 16)), ((32, 16), (8, 16)), ((8, 8), (8, 8))])
def test_split_bsr_blocks(blocksize, sub):
    weight = block_sparse(64, 96, *blocksize)
    split = split_bsr_blocks(dense_to_bsr(weight, blocksize), sub)
    assert split.blocksize == sub
    assert torch.equal(bsr_to_dense(split), weight)
    check = torch.sparse_bsr_tensor(*split[:3], size=split.shape, check_invariants=True)  # valid torch BSR
    assert torch.equal(check.to_dense(), weight)


def test_split_bsr_blocks_error():
    with pytest.raises(ValueError, match=r"blocksize \(16, 12\) must divide the BSR blocksize \(16, 32\)"):
        split_bsr_blocks(dense_to_bsr(torch.zeros(32, 64), (16, 32)), (16, 12))
