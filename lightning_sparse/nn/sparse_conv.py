"""``SparseConv2d``: an inference-only 2-D convolution holding an exported BSR (or CSR: 1x1 blocks) weight.

The weight is stored like :class:`~lightning_sparse.nn.SparseLinear`'s, as BSR components of its matrix view
``(out_channels, in_channels * kh * kw)`` (the view every pattern of :mod:`lightning_sparse.core.patterns` uses).
The forward skips the input channels that no output reads: ``F.conv2d`` over the used channels only. Of the paths
measured on the 2-core CPU for SmallCNN's 64x32x3x3 conv at batch 128 (docs/BENCHMARKS.md, "Kernels"), it is the
one that beats dense: im2col plus torch's CSR matmul (MKL) ran at 0.1-0.2x of dense at 6.5% unstructured density,
a gather of the kept im2col columns plus one GEMM at about 1x, a grouped conv per block row of ``"Rx9"`` blocks
at 0.05-0.8x from 8 groups up. The pattern that pays is therefore whole input channels: ``"<out_channels>x<kh*kw>"``
blocks (``"64x9"`` for a 3x3 conv with 64 outputs), or smaller row blocks as long as few channels are used in all.
An unstructured weight reads nearly every channel, and then the forward is the dense convolution:
:data:`MAX_USED_CHANNEL_FRACTION` is the rule that keeps such layers out of the conversions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_sparse.core.patterns import as_matrix_shape
from lightning_sparse.formats.bsr import BSRWeight, bsr_to_dense, dense_to_bsr, parse_blocksize
from lightning_sparse.nn.sparse_linear import adopt_block_count

__all__ = ["MAX_USED_CHANNEL_FRACTION", "SparseConv2d", "conv_unfit_reason", "slow_conv_reason", "used_input_channels"]

MAX_USED_CHANNEL_FRACTION = 0.5
"""Conversions (``to_sparse_inference``, the export) keep a Conv2d dense unless it reads at most this fraction of
its input channels. Measured on the 2-core CPU (SmallCNN ``features.3``, 64x32x3x3, batch 128, 1 and 2 threads):
3 of 32 channels ran 2.0-3.5x dense, 16 of 32 1.2-1.8x, 24 of 32 0.9-1.0x."""


def used_input_channels(weight: Tensor) -> Tensor:
    """Ascending indices of the input channels that some output reads (a non-zero in ``weight[:, c]``).

    Example::

        >>> w = torch.zeros(2, 3, 1, 1); w[1, 2] = 1.0
        >>> used_input_channels(w).tolist()
        [2]
    """
    return (weight != 0).flatten(2).any(dim=2).any(dim=0).nonzero().flatten()


def conv_unfit_reason(conv: nn.Conv2d, fmt: str, blocksize: tuple[int, int] | None) -> str | None:
    """Why ``conv`` cannot become a :class:`SparseConv2d` in format ``fmt`` (``"bsr"`` with ``blocksize`` blocks,
    or ``"2:4"``), or ``None`` if it can."""
    if fmt != "bsr":
        return f"{fmt} is not a Conv2d format (SparseConv2d stores BSR blocks)"
    if conv.groups != 1:
        return f"groups={conv.groups} is not supported (SparseConv2d needs groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported (SparseConv2d needs padding_mode='zeros')"
    (n, k), (r, c) = as_matrix_shape(conv.weight.shape), blocksize
    return None if n % r == 0 and k % c == 0 else f"matrix view ({n}, {k}) is not divisible by the block {r}x{c}"


def slow_conv_reason(weight: Tensor) -> str | None:
    """Why a conv with this dense-with-zeros ``weight`` would not run faster as :class:`SparseConv2d`, or ``None``."""
    used, total = used_input_channels(weight).numel(), weight.shape[1]
    if used <= MAX_USED_CHANNEL_FRACTION * total:
        return None
    return (
        f"reads {used} of {total} input channels: SparseConv2d skips unused input channels and is faster than dense "
        f"only up to {MAX_USED_CHANNEL_FRACTION:.0%} of them"
    )


def _gather_channels(x: Tensor, channels: Tensor) -> Tensor:
    """``x[..., channels, :, :]`` in ``x``'s memory format (a channels-last input gathers along its innermost dim,
    4x faster than ``index_select(1)`` on it, measured at 256x32x14x14, and stays channels-last)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).index_select(3, channels).permute(0, 3, 1, 2)
    return x.index_select(-3, channels)


def _refresh_after_load(module: SparseConv2d, incompatible_keys: Any) -> None:
    module.refresh()


class SparseConv2d(nn.Module):
    """``F.conv2d(x, W, b, stride, padding, dilation)`` with ``W`` stored as BSR blocks; built with :meth:`from_dense`.

    The forward gathers the input channels that some output reads and runs ``F.conv2d`` over them with the packed
    weight ``W[:, used]`` (no gather when every channel is used: then it is the dense convolution). A
    channels-last input gives a channels-last output, as with ``nn.Conv2d``. Only ``groups=1`` and
    ``padding_mode="zeros"`` are supported. The stored components and the bias are buffers (inference only);
    the packed weight is derived from them (non-persistent) after :meth:`from_dense` and ``load_state_dict``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: ``kh`` or ``(kh, kw)``.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d`` (ints, or ``"same"`` / ``"valid"``).
        dilation: as ``nn.Conv2d``.
        bias: whether the layer has a bias.
        blocksize: BSR block shape ``(R, C)`` over the ``(out_channels, in_channels * kh * kw)`` matrix view, an
            int or ``"RxC"``; 1 (the default) stores CSR, which fits every shape.
        device: device of the (empty) buffers.
        dtype: dtype of the values and bias buffers.

    Raises:
        ValueError: if ``blocksize`` does not divide the matrix view.

    Example::

        >>> conv = nn.Conv2d(8, 16, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight[:, 2:].zero_()  # reads 2 of its 8 input channels
        >>> sparse = SparseConv2d.from_dense(conv)
        >>> x = torch.randn(2, 8, 10, 10)
        >>> sparse.used_channels.tolist(), torch.allclose(sparse(x), conv(x), atol=1e-5)
        ([0, 1], True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        blocksize: int | tuple[int, int] | str = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.blocksize = parse_blocksize(blocksize)
        (r, c), (kh, kw) = self.blocksize, self.kernel_size
        n, k = out_channels, in_channels * kh * kw
        if n % r or k % c:
            raise ValueError(f"blocksize {self.blocksize} must divide the weight's matrix view ({n}, {k})")
        kw_ = {"device": device}
        self.register_buffer("crow_indices", torch.zeros(n // r + 1, dtype=torch.int64, **kw_))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, **kw_))
        self.register_buffer("values", torch.zeros(0, r, c, dtype=dtype, **kw_))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, **kw_) if bias else None)
        self.register_buffer("used_channels", torch.zeros(1, dtype=torch.int64, **kw_), persistent=False)
        self.register_buffer("packed_weight", torch.zeros(n, 1, kh, kw, dtype=dtype, **kw_), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, blocksize: int | tuple[int, int] | str = 1) -> SparseConv2d:
        """An empty (all-zero) layer with ``conv``'s configuration, device and dtype, to ``load_state_dict`` into.

        Raises:
            TypeError: if ``conv`` is not an ``nn.Conv2d``.
            ValueError: if ``conv`` has ``groups != 1`` or ``padding_mode != "zeros"``, or ``blocksize`` does not
                divide its matrix view.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        for argument, value, allowed in (("groups", conv.groups, 1), ("padding_mode", conv.padding_mode, "zeros")):
            if value != allowed:
                raise ValueError(f"SparseConv2d supports {argument}={allowed!r} only, got {argument}={value!r}")
        weight = conv.weight
        config = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.bias is not None, blocksize)
        return cls(conv.in_channels, conv.out_channels, *config, device=weight.device, dtype=weight.dtype)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, blocksize: int | tuple[int, int] | str = 1) -> SparseConv2d:
        """Builds the layer from a dense-with-zeros ``nn.Conv2d`` (weight and bias); the stored weight is exact.

        Args:
            conv: the pruned convolution (``groups=1``, ``padding_mode="zeros"``).
            blocksize: BSR block shape over the ``(out_channels, in_channels * kh * kw)`` matrix view.

        Raises:
            TypeError, ValueError: as :meth:`empty_like`.
        """
        module = cls.empty_like(conv, blocksize)
        weight = conv.weight.detach()
        crow, col, values, _ = dense_to_bsr(weight.reshape(weight.shape[0], -1), module.blocksize)
        module.crow_indices, module.col_indices, module.values = crow, col, values
        if conv.bias is not None:
            module.bias = conv.bias.detach().clone()
        module.refresh()
        return module

    def refresh(self) -> None:
        """Re-derives the used channels and the packed weight from the stored components."""
        weight = self.to_dense()
        used = used_input_channels(weight)
        if used.numel() == 0:  # nothing to read: one all-zero channel, so the output is the bias
            used = used.new_zeros(1)
        self.used_channels = used
        self.packed_weight = weight.index_select(1, used).contiguous()

    def sparse_weight(self) -> BSRWeight:
        """The stored matrix view as a :class:`~lightning_sparse.formats.BSRWeight` (shares the buffers)."""
        shape = (self.out_channels, self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        return BSRWeight(self.crow_indices, self.col_indices, self.values, shape)

    def to_dense(self) -> Tensor:
        """The dense-with-zeros ``(out_channels, in_channels, kh, kw)`` weight."""
        return bsr_to_dense(self.sparse_weight()).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def density(self) -> float:
        """Stored fraction of the dense weight (kept blocks)."""
        return self.sparse_weight().density

    @property
    def used_channel_fraction(self) -> float:
        """Fraction of the input channels the forward reads (what its cost scales with)."""
        return self.used_channels.numel() / self.in_channels if self.packed_weight.any() else 0.0

    def forward(self, x: Tensor) -> Tensor:
        """``F.conv2d`` over the used input channels (see the class docstring)."""
        if self.used_channels.numel() < self.in_channels:
            x = _gather_channels(x, self.used_channels)
        return F.conv2d(x, self.packed_weight, self.bias, self.stride, self.padding, self.dilation)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        adopt_block_count(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, density={self.density:.3f}, used_channels={self.used_channel_fraction:.3f}"
        )
