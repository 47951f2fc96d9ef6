import io

import pytest
import torch
from torch import nn

from lightning_sparse.kernels import has_triton
from lightning_sparse.nn import SparseLinear
from lightning_sparse.nn import sparse_linear as sparse_linear_module


def pruned_linear(in_features=64, out_features=32, pattern="bsr", bias=True):
    """An nn.Linear with 16x16 blocks pruned (block-row 1 empty) or 2:4-pruned along in_features."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if pattern == "bsr":
            keep = torch.rand(out_features // 16, in_features // 16) < 0.5
            keep[1] = False
            linear.weight *= keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
        else:
            linear.weight.view(out_features, -1, 4)[..., 2:] = 0.0
            linear.weight[0, 4:8] = 0.0
    return linear


@pytest.mark.parametrize("fmt", ["bsr", "2:4"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_cpu_forward_matches_dense(fmt, bias, lead):
    linear = pruned_linear(pattern=fmt, bias=bias)
    sparse = SparseLinear.from_dense(linear, format=fmt, blocksize=16)
    x = torch.randn(*lead, 64)
    y = sparse(x)
    torch.testing.assert_close(y, linear(x))
    assert y.is_contiguous() and torch.equal(sparse.to_dense(), linear.weight)


@pytest.mark.parametrize("fmt", ["bsr", "2:4"])
def test_cpu_forward_fp16(fmt):
    linear = pruned_linear(pattern=fmt).half()
    sparse = SparseLinear.from_dense(linear, format=fmt, blocksize=(16, 16))
    x = torch.randn(4, 64, dtype=torch.float16)
    y = sparse(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, linear.float()(x.float()).half(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("chunk_elements", "max_elements"), [(1, 1 << 22), (1 << 22, 1 << 22), (1 << 22, 0)])
def test_bsr_cpu_paths_match_dense(monkeypatch, chunk_elements, max_elements):
    monkeypatch.setattr(sparse_linear_module, "_GATHER_ELEMENTS", chunk_elements)  # 1: one token per chunk
    monkeypatch.setattr(sparse_linear_module, "GATHER_MAX_ELEMENTS", max_elements)  # 0: MKL path
    linear = pruned_linear()
    sparse = SparseLinear.from_dense(linear, blocksize=16)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(sparse(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("fmt", ["bsr", "2:4"])
def test_triton_backend_matches_torch_backend(fmt):
    linear = pruned_linear(pattern=fmt)
    sparse = SparseLinear.from_dense(linear, format=fmt, blocksize=16, backend="triton")
    x = torch.randn(2, 3, 64)
    y_triton = sparse(x)
    sparse.backend = "torch"
    torch.testing.assert_close(y_triton, sparse(x), atol=1e-4, rtol=1e-4)


def test_from_weight_tensor_and_explicit_bias():
    weight = pruned_linear(bias=False).weight.detach()
    bias = torch.randn(32)
    sparse = SparseLinear.from_dense(weight, bias, blocksize="16x32")
    x = torch.randn(3, 64)
    torch.testing.assert_close(sparse(x), x @ weight.T + bias)
    assert sparse.blocksize == (16, 32) and 0 < sparse.density < 1


def test_state_dict_round_trip_with_other_block_count():
    source = SparseLinear.from_dense(pruned_linear(), blocksize=16)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = SparseLinear(64, 32, format="bsr", blocksize=16)  # empty: 0 blocks
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))
    target_24 = SparseLinear(64, 32, format="2:4")
    target_24.load_state_dict(SparseLinear.from_dense(pruned_linear(pattern="2:4"), format="2:4").state_dict())


def test_to_casts_values_and_bias_not_indices():
    sparse = SparseLinear.from_dense(pruned_linear(), blocksize=16).to(torch.float16)
    assert sparse.values.dtype == torch.float16 and sparse.bias.dtype == torch.float16
    assert sparse.crow_indices.dtype == torch.int64 and sparse.col_indices.dtype == torch.int64
    sparse_24 = SparseLinear.from_dense(pruned_linear(pattern="2:4"), format="2:4").to(torch.float16)
    assert sparse_24.packed_idx.dtype == torch.int16 and sparse_24.density == 0.5


def test_extra_repr():
    text = repr(SparseLinear.from_dense(pruned_linear(), blocksize=16))
    assert "format='bsr', blocksize=(16, 16), bias=True" in text and "backend='auto'" in text
    assert "format='2:4', bias=False" in repr(SparseLinear(64, 32, format="2:4", bias=False))


def test_errors():
    with pytest.raises(ValueError, match=r"format must be one of \('bsr', '2:4'\), got 'csr'"):
        SparseLinear(64, 32, format="csr")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        SparseLinear(64, 32, backend="cuda")
    sparse = SparseLinear(64, 32, blocksize=16)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse.backend = "fast"
    with pytest.raises(ValueError, match=r"blocksize \(32, 32\) must divide the weight shape \(48, 64\)"):
        SparseLinear(64, 48)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        SparseLinear(64, 32, blocksize="big")
    with pytest.raises(ValueError, match="2:4 needs in_features divisible by 4, got in_features=6"):
        SparseLinear(6, 32, format="2:4")
    with pytest.raises(TypeError, match="must be an nn.Linear, a Hugging Face Conv1D or a Tensor, got Conv1d"):
        SparseLinear.from_dense(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match=r"weight must be 2-D \(out_features, in_features\), got shape \(4,\)"):
        SparseLinear.from_dense(torch.zeros(4))
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, columns 0..3"):
        SparseLinear.from_dense(torch.ones(8, 8), format="2:4")
