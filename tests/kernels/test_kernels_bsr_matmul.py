import pytest
import torch

from lightning_sparse.formats import BSRWeight, bsr_to_torch, dense_to_bsr
from lightning_sparse.kernels import bsr_linear, bsr_linear_reference, has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}  # (atol, rtol) vs the fp32 reference


def reference(x, bsr, bias):
    return bsr_linear_reference(x, *bsr, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("blocksize", [(16, 16), (32, 32), (16, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(block_sparse, dtype, m, blocksize, with_bias):
    r, c = blocksize
    weight = block_sparse(4 * r, 3 * c, r, c, dtype=dtype)  # block-row 1 empty
    bsr = dense_to_bsr(weight, blocksize)
    x = torch.randn(m, 3 * c, dtype=dtype)
    bias = torch.randn(4 * r, dtype=dtype) if with_bias else None
    y = bsr_linear(x, bsr, bias)
    assert y.shape == (m, 4 * r) and y.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y, reference(x, bsr, bias), atol=atol, rtol=rtol)
    expected_empty_row = torch.zeros(m, r, dtype=dtype) if bias is None else bias[r : 2 * r].expand(m, r)
    assert torch.equal(y[:, r : 2 * r], expected_empty_row)


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5)])
def test_leading_batch_dims(block_sparse, lead):
    bsr = dense_to_bsr(block_sparse(64, 64, 32, 32), 32)
    x = torch.randn(*lead, 64)
    bias = torch.randn(64)
    y = bsr_linear(x, bsr, bias)
    assert y.shape == (*lead, 64)
    torch.testing.assert_close(y, reference(x, bsr, bias), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocksize", [(48, 16), (8, 8), (16, 64)])
def test_other_block_shapes(block_sparse, blocksize):
    """Sides that are not powers of two >= 16 are padded and masked inside the kernel."""
    r, c = blocksize
    bsr = dense_to_bsr(block_sparse(2 * r, 2 * c, r, c, empty_rows=()), blocksize)
    x = torch.randn(5, 2 * c)
    torch.testing.assert_close(bsr_linear(x, bsr), reference(x, bsr, None), atol=1e-4, rtol=1e-4)


def test_bfloat16_with_fp32_dot_in_interpreter(block_sparse):
    """The interpreter's bf16 tl.dot is wrong, so the launcher upcasts there; its bf16 store truncates (1 ulp)."""
    bsr = dense_to_bsr(block_sparse(32, 32, 16, 16, dtype=torch.bfloat16), 16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(bsr_linear(x, bsr), reference(x, bsr, None), atol=2e-2, rtol=2e-2)


def test_non_contiguous_input_and_torch_bsr_weight(block_sparse):
    weight = block_sparse(32, 64, 16, 16)
    x = torch.randn(64, 7).T  # strides (1, 7)
    expected = reference(x, dense_to_bsr(weight, 16), None)
    torch.testing.assert_close(bsr_linear(x, bsr_to_torch(dense_to_bsr(weight, 16))), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bsr_linear(x, weight.to_sparse_bsr(16)), expected, atol=1e-4, rtol=1e-4)


def test_short_circuits():
    empty = dense_to_bsr(torch.zeros(32, 64), 16)
    bias = torch.randn(32)
    assert torch.equal(bsr_linear(torch.randn(2, 3, 64), empty), torch.zeros(2, 3, 32))
    assert torch.equal(bsr_linear(torch.randn(3, 64), empty, bias), bias.expand(3, 32))
    full = dense_to_bsr(torch.randn(32, 64), 16)
    assert bsr_linear(torch.randn(0, 4, 64), full, bias).shape == (0, 4, 32)


def test_errors(block_sparse, monkeypatch):
    bsr = dense_to_bsr(block_sparse(32, 64, 16, 16), 16)
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match="weight must be a BSRWeight or a torch.sparse_bsr tensor, got Tensor with"):
        bsr_linear(x, torch.randn(32, 64))
    with pytest.raises(TypeError, match="weight must be a BSRWeight or a torch.sparse_bsr tensor, got dict"):
        bsr_linear(x, {})
    with pytest.raises(ValueError, match=r"col_indices must have shape \(\d+,\)"):
        bsr_linear(x, BSRWeight(bsr.crow_indices, bsr.col_indices[:1], bsr.values, bsr.shape))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        bsr_linear([[1.0]], bsr)
    with pytest.raises(TypeError, match="x dtype must be one of float16, bfloat16, float32, got torch.float64"):
        bsr_linear(x.double(), bsr.to(dtype=torch.float64))
    with pytest.raises(TypeError, match="x and weight dtypes must match, got x torch.float16 and weight torch.float32"):
        bsr_linear(x.half(), bsr)
    with pytest.raises(ValueError, match="x and weight must share a device, got x on meta and weight on cpu"):
        bsr_linear(x.to("meta"), bsr)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\) to match the weight's K=64, got \(3, 32\)"):
        bsr_linear(x[:, :32], bsr)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        bsr_linear(torch.tensor(1.0), bsr)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\), got \(64,\)"):
        bsr_linear(x, bsr, torch.zeros(64))
    with pytest.raises(TypeError, match="bias dtype must match x dtype torch.float32, got torch.float16"):
        bsr_linear(x, bsr, torch.zeros(32, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias must be on x's device cpu, got meta"):
        bsr_linear(x, bsr, torch.zeros(32, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x must be a CUDA tensor \\(or run with TRITON_INTERPRET=1 on CPU\\)"):
        bsr_linear(x, bsr)


def test_without_triton(block_sparse, monkeypatch):
    from lightning_sparse.kernels import _support

    monkeypatch.setattr(_support, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match=r"bsr_linear\(\) needs triton"):
        bsr_linear(torch.randn(3, 64), dense_to_bsr(block_sparse(32, 64, 16, 16), 16))


def test_skip_checks(block_sparse):
    bsr = dense_to_bsr(block_sparse(32, 64, 16, 16), 16)
    x = torch.randn(3, 64)
    torch.testing.assert_close(bsr_linear(x, bsr, skip_checks=True), reference(x, bsr, None), atol=1e-4, rtol=1e-4)
