"""Triton availability and the launch checks shared by the kernel launchers (never imports triton itself)."""

import functools
import importlib.util
import os

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def has_triton() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def require_triton(f_name: str) -> None:
    """Raises a RuntimeError naming ``f_name`` when triton is not installed."""
    if not has_triton():
        raise RuntimeError(f"{f_name}() needs triton; install it with `pip install lightning-sparse[triton]`")


def check_launch(f_name: str, x: Tensor, values: Tensor, k: int, bias: Tensor | None, n: int) -> None:
    """Checks shared by every linear kernel: tensor types, dtypes, devices, K and bias shape.

    Raises:
        TypeError: if ``x`` is not a tensor, its dtype is not fp16/bf16/fp32, or ``x``, weight and bias dtypes differ.
        ValueError: on a device mismatch, a device the kernel cannot run on, a wrong last dim, or a wrong bias shape.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{f_name}(): x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{f_name}(): x dtype must be one of float16, bfloat16, float32, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"{f_name}(): x and weight dtypes must match, got x {x.dtype} and weight {values.dtype}")
    if values.device != x.device:
        raise ValueError(
            f"{f_name}(): x and weight must share a device, got x on {x.device} and weight on {values.device}"
        )
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{f_name}(): x must be a CUDA tensor (or run with TRITON_INTERPRET=1 on CPU), got device {x.device}"
        )
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{f_name}(): x must have shape (..., {k}) to match the weight's K={k}, got {tuple(x.shape)}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"{f_name}(): bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{f_name}(): bias dtype must match x dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{f_name}(): bias must be on x's device {x.device}, got {bias.device}")
