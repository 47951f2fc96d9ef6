"""``y = x W^T + b`` with a 2:4-compressed weight: checks -> launcher -> (configs + ``@triton.jit`` kernel, lazily).

Mainline Triton has no sparse tensor-core MMA, so the kernel (``_sparse24_matmul_triton.sparse24_linear_kernel``)
reads the compressed weight (half the values plus 2 bits of index per kept value: 0.5625x the fp16 bytes),
rebuilds each dense K-tile in registers and runs a dense ``tl.dot``. The win is memory traffic, so it targets
small token counts (1-64 tokens, where a linear layer is memory-bound); at large token counts expect dense speed.
"""

import torch
from torch import Tensor

from lightning_sparse.formats.semi_structured import Sparse24Weight
from lightning_sparse.kernels._support import check_launch, interpreting, next_pow2, require_triton

__all__ = ["sparse24_linear"]


def _check_sparse24(f_name: str, weight: Sparse24Weight) -> None:
    if not isinstance(weight, Sparse24Weight):
        raise TypeError(f"{f_name}(): weight must be a Sparse24Weight, got {type(weight).__name__}")
    values, packed_idx, (n, k) = weight
    if k % 4 or values.shape != (n, k // 2):
        raise ValueError(
            f"{f_name}(): weight values must have shape (N, K/2) = ({n}, {k // 2}) with K divisible by 4 "
            f"for shape {(n, k)}, got {tuple(values.shape)}"
        )
    if packed_idx.dtype != torch.int16 or packed_idx.shape != (n, -(-k // 16)):
        raise ValueError(
            f"{f_name}(): weight packed_idx must be int16 of shape ({n}, {-(-k // 16)}), "
            f"got {packed_idx.dtype} of shape {tuple(packed_idx.shape)}"
        )
    if packed_idx.device != values.device:
        raise ValueError(f"{f_name}(): packed_idx is on {packed_idx.device} but values on {values.device}")


def sparse24_linear(x: Tensor, weight: Sparse24Weight, bias: Tensor | None = None, skip_checks: bool = False) -> Tensor:
    """Computes ``x @ W.T + bias`` for a 2:4-compressed ``W`` with a Triton kernel (fp32 accumulation).

    Args:
        x: ``(..., K)`` activations, fp16/bf16/fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``(N, K)`` weight as a :class:`~lightning_sparse.formats.Sparse24Weight` with the dtype and device
            of ``x``.
        bias: optional ``(N,)`` bias with the dtype and device of ``x``.
        skip_checks: skip the argument checks (for callers that validated once, e.g. inside a module).

    Returns:
        ``(..., N)`` output in ``x``'s dtype.

    Raises:
        RuntimeError: if triton is not installed.
        TypeError: if ``weight`` is not a Sparse24Weight, or the dtypes are unsupported or differ.
        ValueError: on inconsistent weight components, mismatched devices, a wrong last dim of ``x`` or bias shape.

    Example::

        >>> from lightning_sparse.formats import dense_to_sparse24
        >>> w = torch.randn(64, 128, device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> w[:, 2::4] = 0; w[:, 3::4] = 0  # doctest: +SKIP
        >>> x = torch.randn(3, 128, device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> y = sparse24_linear(x, dense_to_sparse24(w))  # (3, 64)  # doctest: +SKIP
    """
    f_name = "sparse24_linear"
    require_triton(f_name)
    if not skip_checks:
        _check_sparse24(f_name, weight)
        check_launch(f_name, x, weight.values, weight.shape[1], bias, weight.shape[0])
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = x2.new_zeros(m, n) if bias is None else bias.expand(m, n).clone()
        return y.reshape(*lead, n)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _launch(x2, weight, bias, y)
    return y.reshape(*lead, n)


def _launch(x: Tensor, weight: Sparse24Weight, bias: Tensor | None, y: Tensor) -> None:
    from lightning_sparse.kernels import _sparse24_matmul_triton as kernels

    values, packed_idx, (n, k) = weight
    m = x.shape[0]
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = dict(
        x_ptr=x,
        values_ptr=values,
        meta_ptr=packed_idx,
        bias_ptr=bias if bias is not None else y,  # never read without HAS_BIAS
        y_ptr=y,
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_vn=values.stride(0),
        stride_vk=values.stride(1),
        stride_mn=packed_idx.stride(0),
        stride_mk=packed_idx.stride(1),
        stride_ym=y.stride(0),
        stride_yn=y.stride(1),
        m_bucket=next_pow2(m),
        HAS_BIAS=bias is not None,
        DOT_FP32=interpreting() and x.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
        INPUT_PRECISION=fp32_precision if x.dtype == torch.float32 else "tf32",
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (-(-n // meta["BLOCK_N"]), -(-m // meta["BLOCK_M"]))

    if interpreting():  # fixed config: no autotuning in the CPU interpreter
        meta = {"BLOCK_M": min(64, max(16, next_pow2(m))), "BLOCK_N": 64, "BLOCK_K": 64}
        kernels.sparse24_linear_kernel[grid(meta)](**args, **meta)
    else:
        kernels.sparse24_linear_kernel_autotuned[grid](**args)
