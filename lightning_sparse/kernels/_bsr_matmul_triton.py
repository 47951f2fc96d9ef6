"""Autotune configs and the ``@triton.jit`` kernel behind :func:`lightning_sparse.kernels.bsr_linear`.

Imports triton at module level: only :mod:`lightning_sparse.kernels.bsr_matmul` imports this module, lazily,
on the first launch (so ``TRITON_INTERPRET`` is read then, and importing the package never needs triton).
"""

import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for br in (16, 32, 64, 128)
        for w, s in ((4, 3), (8, 3))
        if bm * br <= 128 * 64
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drops configs whose tiles overshoot the problem: BLOCK_R beyond the padded block height, BLOCK_M beyond M."""
    args = {**named_args, **kwargs}
    r_pad = max(16, triton.next_power_of_2(args["R"]))
    m_pad = max(16, args["m_bucket"])
    kept = [c for c in configs if c.kwargs["BLOCK_R"] <= r_pad and c.kwargs["BLOCK_M"] <= m_pad]
    return kept or configs[:1]


@triton.jit
def bsr_linear_kernel(
    x_ptr,
    crow_ptr,
    col_ptr,
    values_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_xk,
    stride_vb,
    stride_vr,
    stride_vc,
    stride_ym,
    stride_yn,
    R: tl.constexpr,
    C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program computes y[BLOCK_M tokens, BLOCK_R rows of one block-row] as the sum over that row's blocks.

    ``N`` and ``K`` (the weight shape) only key the autotuner; ``m_bucket`` is the token count rounded up to a
    power of two, so the tuned config is reused across nearby token counts.
    """
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    n_sub = (R + BLOCK_R - 1) // BLOCK_R
    block_row = pid_r // n_sub
    offs_r = (pid_r % n_sub) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_x = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    mask_w = (offs_c < C)[:, None] & mask_r[None, :]

    x_tile_ptr = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :] * stride_xk
    w_tile_ptr = values_ptr + offs_c[:, None] * stride_vc + offs_r[None, :] * stride_vr  # block transposed: (C, R)
    start = tl.load(crow_ptr + block_row).to(tl.int64)  # int64 loop index: no overflow in i * stride_vb
    end = tl.load(crow_ptr + block_row + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(start, end):
        col = tl.load(col_ptr + i).to(tl.int64)
        x = tl.load(x_tile_ptr + col * C * stride_xk, mask=mask_x, other=0.0)
        w = tl.load(w_tile_ptr + i * stride_vb, mask=mask_w, other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    offs_n = block_row.to(tl.int64) * R + offs_r
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    y_tile_ptr = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_tile_ptr, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_r[None, :])


bsr_linear_kernel_autotuned = triton.autotune(
    configs=_configs(), key=["m_bucket", "N", "K", "R", "C"], prune_configs_by={"early_config_prune": _prune_configs}
)(bsr_linear_kernel)
