import pytest
import torch

from lightning_sparse.formats import (
    Sparse24Weight,
    dense_to_sparse24,
    pack_sparse24_indices,
    sparse24_to_dense,
    to_torch_semi_structured,
    unpack_sparse24_indices,
)


def random_24(n, k, dtype=torch.float32):
    """Random 2:4 weight; row 0 is empty, row 1 keeps one value per group, row 2 has an empty group."""
    keep = torch.rand(n, k // 4, 4).argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    weight = torch.randn(n, k) * mask
    weight[0] = 0.0
    weight[1] = torch.where(torch.arange(k) % 4 == 3, torch.randn(k), 0.0)
    weight[2, 4:8] = 0.0
    return weight.to(dtype)


@pytest.mark.parametrize(("n", "k"), [(8, 16), (16, 64), (5, 20), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(n, k, dtype):
    weight = random_24(n, k, dtype)
    sp = dense_to_sparse24(weight)
    assert sp.values.shape == (n, k // 2) and sp.values.dtype == dtype
    assert sp.packed_idx.shape == (n, -(-k // 16)) and sp.packed_idx.dtype == torch.int16
    assert torch.equal(sparse24_to_dense(sp), weight)


def test_all_zero_weight():
    sp = dense_to_sparse24(torch.zeros(4, 32))
    assert torch.equal(sp.values, torch.zeros(4, 16))
    assert torch.equal(sparse24_to_dense(sp), torch.zeros(4, 32))


def test_layout_nibbles_and_words():
    # groups [x,x,0,0] [0,0,x,x] [x,0,x,0] [0,x,0,x] have the CUTLASS nibble codes 0b0100, 0b1110, 0b1000, 0b1101
    row = torch.tensor([1.0, 2, 0, 0, 0, 0, 3, 4, 5, 0, 6, 0, 0, 7, 0, 8])
    sp = dense_to_sparse24(row[None])
    assert sp.values.tolist() == [[1.0, 2, 3, 4, 5, 6, 7, 8]]
    word = 0b0100 | 0b1110 << 4 | 0b1000 << 8 | 0b1101 << 12
    assert sp.packed_idx.tolist() == [[word - (1 << 16)]]  # the top bit set: reads as a negative int16


def test_padding_uses_lowest_free_positions():
    sp = dense_to_sparse24(torch.tensor([[0.0, 0, 9, 0, 0, 0, 0, 0]]))
    assert unpack_sparse24_indices(sp.packed_idx, 2).tolist() == [[[0, 2], [0, 1]]]
    assert sp.values.tolist() == [[0.0, 9.0, 0.0, 0.0]]


def test_pack_unpack_every_pair():
    pairs = torch.tensor([(i, j) for i in range(4) for j in range(i + 1, 4)])  # 6 valid pairs
    idx = pairs.repeat(3, 1).reshape(2, 9, 2)  # 9 groups per row: a partly filled last word
    packed = pack_sparse24_indices(idx)
    assert packed.shape == (2, 3)
    assert torch.equal(unpack_sparse24_indices(packed, 9), idx)


def test_values_match_torch_cutlass_conversion():
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    weight = random_24(32, 64, torch.float16)
    weight[:3] = random_24(35, 64, torch.float16)[3:6]  # every group with exactly 2 non-zeros
    packed, _ = conversions.sparse_semi_structured_from_dense_cutlass(weight)
    assert torch.equal(dense_to_sparse24(weight).values, packed)


def test_to_moves_and_casts():
    sp = dense_to_sparse24(random_24(4, 16)).to("cpu", torch.float16)
    assert isinstance(sp, Sparse24Weight) and sp.values.dtype == torch.float16 and sp.packed_idx.dtype == torch.int16


def test_errors():
    with pytest.raises(ValueError, match=r"weight must be 2-D \(N, K\), got shape \(8,\)"):
        dense_to_sparse24(torch.zeros(8))
    with pytest.raises(ValueError, match=r"K divisible by 4, got weight shape \(2, 6\)"):
        dense_to_sparse24(torch.zeros(2, 6))
    weight = torch.zeros(3, 16)
    weight[2, 0:3] = 1.0
    weight[1, 4:8] = 1.0  # the first offending group in row-major order
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 1, columns 4..7 hold 4 non-zeros"):
        dense_to_sparse24(weight)


def test_to_torch_semi_structured_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA weight, got device cpu"):
        to_torch_semi_structured(torch.zeros(32, 64))
