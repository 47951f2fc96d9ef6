"""Autotune configs and the ``@triton.jit`` kernel behind :func:`lightning_sparse.kernels.sparse24_linear`.

Imports triton at module level: only :mod:`lightning_sparse.kernels.sparse24_matmul` imports this module, lazily,
on the first launch (so ``TRITON_INTERPRET`` is read then, and importing the package never needs triton).
"""

import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64)
        for bn in (32, 64, 128)
        for bk in (64, 128)
        for w, s in ((4, 3), (8, 4))
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drops configs with token tiles larger than the (rounded-up) token count."""
    args = {**named_args, **kwargs}
    m_pad = max(16, args["m_bucket"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_pad]
    return kept or configs[:1]


@triton.jit
def sparse24_linear_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    m_bucket,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_vk,
    stride_mn,
    stride_mk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program computes y[BLOCK_M tokens, BLOCK_N outputs], streaming K in BLOCK_K tiles.

    Per K-tile it loads the compressed ``(BLOCK_N, BLOCK_K/2)`` values and ``(BLOCK_N, BLOCK_K/16)`` index words
    (contiguous, coalesced loads), and rebuilds the dense tile in registers: position ``p`` of group ``g`` takes
    the group's first kept value when its first index is ``p``, the second when its second index is ``p``, else 0.
    ``BLOCK_K`` must be a multiple of 16 (one index word covers 16 columns).
    ``m_bucket`` (token count rounded up to a power of two) only keys the autotuner.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    GROUPS: tl.constexpr = BLOCK_K // 4
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_w = tl.arange(0, BLOCK_K // 16)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_tile_ptr = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    v_tile_ptr = values_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_v[None, :] * stride_vk
    meta_tile_ptr = meta_ptr + offs_n[:, None].to(tl.int64) * stride_mn + offs_w[None, :] * stride_mk
    nibble_shift = 4 * tl.arange(0, 4)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x_mask = mask_m[:, None] & (k0 + offs_k < K)[None, :]
        x = tl.load(x_tile_ptr + k0 * stride_xk, mask=x_mask, other=0.0)
        v_mask = mask_n[:, None] & (k0 // 2 + offs_v < K // 2)[None, :]
        v = tl.load(v_tile_ptr + (k0 // 2) * stride_vk, mask=v_mask, other=0.0)  # (BLOCK_N, BLOCK_K/2)
        meta_mask = mask_n[:, None] & (k0 // 16 + offs_w < (K + 15) // 16)[None, :]
        words = tl.load(meta_tile_ptr + (k0 // 16) * stride_mk, mask=meta_mask, other=0).to(tl.int32)
        nibbles = tl.reshape((words[:, :, None] >> nibble_shift[None, None, :]) & 15, (BLOCK_N, GROUPS))
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, GROUPS, 2)))
        first, second = nibbles & 3, nibbles >> 2
        w0 = tl.where(first == 0, v0, 0.0)
        w1 = tl.where(first == 1, v0, tl.where(second == 1, v1, 0.0))
        w2 = tl.where(first == 2, v0, tl.where(second == 2, v1, 0.0))
        w3 = tl.where(second == 3, v1, 0.0)  # the first index of a pair is never 3
        # join(join(w0, w2), join(w1, w3))[n, g, j, i] = w_{2j+i}: row-major flattening puts w_p at column 4g + p
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
        w = tl.trans(w).to(x.dtype)  # (BLOCK_K, BLOCK_N) tile of W^T
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_tile_ptr = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_tile_ptr, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


sparse24_linear_kernel_autotuned = triton.autotune(
    configs=_configs(), key=["m_bucket", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs}
)(sparse24_linear_kernel)
