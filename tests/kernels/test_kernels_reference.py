import pytest
import torch

from lightning_sparse.formats import dense_to_bsr, dense_to_sparse24
from lightning_sparse.kernels import bsr_linear_reference, sparse24_linear_reference


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bsr_reference_matches_dense(block_sparse, lead, with_bias):
    weight = block_sparse(64, 96, 16, 32)
    bias = torch.randn(64) if with_bias else None
    x = torch.randn(*lead, 96)
    crow, col, values, shape = dense_to_bsr(weight, (16, 32))
    y = bsr_linear_reference(x, crow, col, values, shape, bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))


def test_bsr_reference_empty_weight_and_fp16_output():
    crow, col, values, shape = dense_to_bsr(torch.zeros(32, 32, dtype=torch.float16), 16)
    y = bsr_linear_reference(torch.randn(3, 32, dtype=torch.float16), crow, col, values, shape)
    assert y.dtype == torch.float16 and torch.equal(y, torch.zeros(3, 32, dtype=torch.float16))


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse24_reference_matches_dense(sparse_24, lead, with_bias):
    weight = sparse_24(48, 40)
    bias = torch.randn(48) if with_bias else None
    x = torch.randn(*lead, 40)
    values, packed_idx, _ = dense_to_sparse24(weight)
    y = sparse24_linear_reference(x, values, packed_idx, bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))


def test_references_accumulate_in_fp32():
    # 4096 fp16 products of 1.0: an fp16 running sum would stall at 2048
    x = torch.ones(1, 4096, dtype=torch.float16)
    crow, col, values, shape = dense_to_bsr(torch.ones(16, 4096, dtype=torch.float16), 16)
    assert bsr_linear_reference(x, crow, col, values, shape)[0, 0].item() == 4096
    weight = torch.zeros(16, 4096, dtype=torch.float16)
    weight[:, ::2] = 1.0
    values, packed_idx, _ = dense_to_sparse24(weight)
    assert sparse24_linear_reference(x, values, packed_idx)[0, 0].item() == 2048
