import pytest
import torch

from lightning_sparse.formats import Sparse24Weight, dense_to_sparse24
from lightning_sparse.kernels import has_triton, sparse24_linear, sparse24_linear_reference

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}  # (atol, rtol) vs the fp32 reference


def reference(x, weight, bias):
    return sparse24_linear_reference(x, weight.values, weight.packed_idx, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (40, 100)])  # 100: K not a multiple of 16 nor of the K-tile
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(sparse_24, dtype, m, n, k, with_bias):
    weight = dense_to_sparse24(sparse_24(n, k, dtype))
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    y = sparse24_linear(x, weight, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y, reference(x, weight, bias), atol=atol, rtol=rtol)
    assert torch.equal(y[:, 0], torch.zeros(m, dtype=dtype) if bias is None else bias[0].expand(m))  # empty row


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5)])
def test_leading_batch_dims(sparse_24, lead):
    weight = dense_to_sparse24(sparse_24(48, 32))
    x = torch.randn(*lead, 32)
    bias = torch.randn(48)
    y = sparse24_linear(x, weight, bias)
    assert y.shape == (*lead, 48)
    torch.testing.assert_close(y, reference(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_bfloat16_with_fp32_dot_in_interpreter(sparse_24):
    """The interpreter's bf16 tl.dot is wrong, so the launcher upcasts there; its bf16 store truncates (1 ulp)."""
    weight = dense_to_sparse24(sparse_24(32, 64, torch.bfloat16))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(sparse24_linear(x, weight), reference(x, weight, None), atol=2e-2, rtol=2e-2)


def test_non_contiguous_input(sparse_24):
    weight = dense_to_sparse24(sparse_24(32, 64))
    x = torch.randn(64, 7).T
    torch.testing.assert_close(sparse24_linear(x, weight), reference(x, weight, None), atol=1e-4, rtol=1e-4)


def test_short_circuits(sparse_24):
    weight = dense_to_sparse24(sparse_24(32, 64))
    bias = torch.randn(32)
    assert sparse24_linear(torch.randn(0, 64), weight, bias).shape == (0, 32)
    assert sparse24_linear(torch.randn(2, 0, 64), weight).shape == (2, 0, 32)


def test_errors(sparse_24, monkeypatch):
    weight = dense_to_sparse24(sparse_24(32, 64))
    values, packed_idx, shape = weight
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match="weight must be a Sparse24Weight, got tuple"):
        sparse24_linear(x, (values, packed_idx, shape))
    with pytest.raises(ValueError, match=r"values must have shape \(N, K/2\) = \(32, 32\) .* got \(32, 16\)"):
        sparse24_linear(x, Sparse24Weight(values[:, :16], packed_idx, shape))
    with pytest.raises(ValueError, match=r"values must have shape .* with K divisible by 4 for shape \(32, 66\)"):
        sparse24_linear(x, Sparse24Weight(values, packed_idx, (32, 66)))
    with pytest.raises(ValueError, match=r"packed_idx must be int16 of shape \(32, 4\), got torch.int32"):
        sparse24_linear(x, Sparse24Weight(values, packed_idx.int(), shape))
    with pytest.raises(
        ValueError, match=r"packed_idx must be int16 of shape \(32, 4\), got torch.int16 of shape \(32, 2\)"
    ):
        sparse24_linear(x, Sparse24Weight(values, packed_idx[:, :2], shape))
    with pytest.raises(ValueError, match="packed_idx is on meta but values on cpu"):
        sparse24_linear(x, Sparse24Weight(values, packed_idx.to("meta"), shape))
    with pytest.raises(TypeError, match="x and weight dtypes must match"):
        sparse24_linear(x.half(), weight)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        sparse24_linear(x[:, :60], weight)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        sparse24_linear(x, weight, torch.zeros(3))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        sparse24_linear(x, weight)


def test_without_triton(sparse_24, monkeypatch):
    from lightning_sparse.kernels import _support

    monkeypatch.setattr(_support, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match=r"sparse24_linear\(\) needs triton"):
        sparse24_linear(torch.randn(3, 64), dense_to_sparse24(sparse_24(32, 64)))


def test_skip_checks(sparse_24):
    weight = dense_to_sparse24(sparse_24(32, 64))
    x = torch.randn(3, 64)
    torch.testing.assert_close(sparse24_linear(x, weight, skip_checks=True), reference(x, weight, None))
