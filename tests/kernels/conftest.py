"""Kernel tests run the Triton kernels in the CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated with ``@triton.jit``; lightning_sparse imports its kernel
modules only on the first launch, so setting it here (at collection, before any test runs) is early enough even
when triton itself was imported before.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _block_sparse(n, k, r, c, density=0.5, empty_rows=(1,), dtype=torch.float32):
    keep = torch.rand(n // r, k // c) < density
    keep[:, 0] = True
    keep[list(empty_rows)] = False
    return (torch.randn(n, k) * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)).to(dtype)


def _sparse_24(n, k, dtype=torch.float32):
    keep = torch.rand(n, k // 4, 4).argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    weight = torch.randn(n, k) * mask
    weight[0] = 0.0  # an empty row
    weight[1, ::4] = 0.0  # groups with one non-zero or none
    return weight.to(dtype)


@pytest.fixture
def block_sparse():
    """Factory: a random (n, k) block-sparse weight with RxC blocks; block-rows in ``empty_rows`` are empty."""
    return _block_sparse


@pytest.fixture
def sparse_24():
    """Factory: a random (n, k) 2:4 weight with an empty row and groups holding fewer than 2 non-zeros."""
    return _sparse_24
