"""``y = x W^T + b`` with a BSR weight: checks -> launcher -> (configs + ``@triton.jit`` kernel, imported lazily).

The kernel (``_bsr_matmul_triton.bsr_linear_kernel``) runs one program per (``BLOCK_M`` tokens, ``BLOCK_R`` rows
of one block-row). It walks the block-row's stored blocks, loads each ``R x C`` block and the matching
``BLOCK_M x C`` slice of ``x``, and accumulates ``tl.dot`` in fp32. Tokens are masked, so any token count works;
block sides are padded to powers of two >= 16 inside the kernel, so any block shape works (powers of two
>= 16 waste nothing). Empty block-rows write the bias (or zeros). Tiling over block-rows *and* over sub-rows
of a block and tokens keeps enough programs in flight for small token counts.
"""

import torch
from torch import Tensor

from lightning_sparse.formats.bsr import BSRWeight, bsr_from_torch, check_bsr
from lightning_sparse.kernels._support import check_launch, interpreting, next_pow2, require_triton

__all__ = ["bsr_linear"]


def _as_bsr(f_name: str, weight: BSRWeight | Tensor) -> BSRWeight:
    if isinstance(weight, BSRWeight):
        return weight
    if isinstance(weight, Tensor) and weight.layout == torch.sparse_bsr:
        return bsr_from_torch(weight)
    raise TypeError(
        f"{f_name}(): weight must be a BSRWeight or a torch.sparse_bsr tensor, got {type(weight).__name__}"
        + (f" with layout {weight.layout}" if isinstance(weight, Tensor) else "")
    )


def bsr_linear(x: Tensor, weight: BSRWeight | Tensor, bias: Tensor | None = None, skip_checks: bool = False) -> Tensor:
    """Computes ``x @ W.T + bias`` for a block-sparse ``W`` with a Triton kernel (fp32 accumulation).

    Args:
        x: ``(..., K)`` activations, fp16/bf16/fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``(N, K)`` weight as a :class:`~lightning_sparse.formats.BSRWeight` (or a ``torch.sparse_bsr``
            tensor) with the dtype and device of ``x``.
        bias: optional ``(N,)`` bias with the dtype and device of ``x``.
        skip_checks: skip the argument checks (for callers that validated once, e.g. inside a module).

    Returns:
        ``(..., N)`` output in ``x``'s dtype.

    Raises:
        RuntimeError: if triton is not installed.
        TypeError: if ``weight`` is not BSR, or the dtypes are unsupported or differ.
        ValueError: on inconsistent BSR components, mismatched devices, a wrong last dim of ``x`` or bias shape.

    Example::

        >>> from lightning_sparse.formats import dense_to_bsr
        >>> w = torch.randn(64, 128, device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> x = torch.randn(3, 128, device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> y = bsr_linear(x, dense_to_bsr(w, 32))  # (3, 64)  # doctest: +SKIP
    """
    f_name = "bsr_linear"
    require_triton(f_name)
    weight = _as_bsr(f_name, weight)
    if not skip_checks:
        check_bsr(weight)
        check_launch(f_name, x, weight.values, weight.shape[1], bias, weight.shape[0])
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or weight.nnzb == 0:
        y = x2.new_zeros(m, n) if bias is None else bias.expand(m, n).clone()
        return y.reshape(*lead, n)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _launch(x2, weight, bias, y)
    return y.reshape(*lead, n)


def _launch(x: Tensor, weight: BSRWeight, bias: Tensor | None, y: Tensor) -> None:
    from lightning_sparse.kernels import _bsr_matmul_triton as kernels

    crow, col, values, (n, k) = weight
    r, c = weight.blocksize
    m = x.shape[0]
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = dict(
        x_ptr=x,
        crow_ptr=crow,
        col_ptr=col,
        values_ptr=values,
        bias_ptr=bias if bias is not None else y,  # never read without HAS_BIAS
        y_ptr=y,
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_vb=values.stride(0),
        stride_vr=values.stride(1),
        stride_vc=values.stride(2),
        stride_ym=y.stride(0),
        stride_yn=y.stride(1),
        R=r,
        C=c,
        m_bucket=next_pow2(m),
        HAS_BIAS=bias is not None,
        DOT_FP32=interpreting() and x.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
        INPUT_PRECISION=fp32_precision if x.dtype == torch.float32 else "tf32",
        BLOCK_C=max(16, next_pow2(c)),
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (n // r * -(-r // meta["BLOCK_R"]), -(-m // meta["BLOCK_M"]))

    if interpreting():  # fixed config: no autotuning in the CPU interpreter
        meta = {"BLOCK_M": min(64, max(16, next_pow2(m))), "BLOCK_R": max(16, next_pow2(r))}
        kernels.bsr_linear_kernel[grid(meta)](**args, **meta)
    else:
        kernels.bsr_linear_kernel_autotuned[grid](**args)
