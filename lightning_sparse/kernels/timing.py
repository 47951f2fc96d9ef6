"""Side-by-side timing of dense vs sparse linear and conv layers at a real shape (used by ``KernelBenchmark``).

On CUDA every candidate is timed with ``triton.testing.do_bench`` (median); on CPU with
``torch.utils.benchmark.Timer`` in alternating rounds (median), so load from other processes hits every candidate
alike. Each candidate's output is checked against the dense layer's before it is timed; a candidate that fails or is
unavailable becomes a reason string instead of a time.

Example::

    >>> from torch import nn
    >>> layer = nn.Linear(64, 32)
    >>> _ = layer.weight.data[:, 32:].zero_()
    >>> times = time_calls(linear_candidates(layer, torch.randn(8, 64), "bsr", (32, 32)), "cpu", warmup=1, rep=2)
    >>> sorted(times), all(t > 0 for t in times.values())
    (['SparseLinear', 'dense F.linear'], True)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from lightning_sparse.formats.bsr import bsr_to_torch
from lightning_sparse.formats.semi_structured import to_torch_semi_structured
from lightning_sparse.kernels.bsr_matmul import bsr_linear
from lightning_sparse.kernels.sparse24_matmul import sparse24_linear
from lightning_sparse.nn.eligible import linear_kind
from lightning_sparse.nn.sparse_conv import SparseConv2d
from lightning_sparse.nn.sparse_linear import SparseLinear

DENSE, SPARSE = "dense F.linear", "SparseLinear"
"""Candidate names: dense ``F.linear`` and what an exported model runs (:class:`SparseLinear`'s dispatch)."""
DENSE_CONV, SPARSE_CONV = "dense Conv2d", "SparseConv2d"
"""Candidate names of a convolution: the dense ``nn.Conv2d`` and :class:`SparseConv2d`."""


def _describe(err: Exception) -> str:
    first_line = str(err).splitlines()[0][:120] if str(err) else ""
    return f"{type(err).__name__}: {first_line}"


def _torch_bsr_mm(sparse: SparseLinear, x: Tensor) -> Callable[[], Tensor]:
    from torch.sparse import _triton_ops

    if _triton_ops.bsr_dense_mm is None:
        raise RuntimeError("torch.sparse._triton_ops.bsr_dense_mm is unavailable in this torch build")
    weight, bias, x_t = bsr_to_torch(sparse.sparse_weight()), sparse.bias, x.T
    return lambda: _triton_ops.bsr_dense_mm(weight, x_t).T + (0 if bias is None else bias)


def _torch_semi_structured(weight: Tensor, bias: Tensor | None, x: Tensor) -> Callable[[], Tensor]:
    weight = to_torch_semi_structured(weight.contiguous())
    return lambda: F.linear(x, weight, bias)


def linear_candidates(
    linear: nn.Module, x: Tensor, fmt: str, blocksize: tuple[int, int] | None
) -> dict[str, Callable[[], Tensor]]:
    """Callables computing ``linear(x)``: dense, :class:`SparseLinear`, and on CUDA our kernel and torch's peer.

    Args:
        linear: the dense-with-zeros ``nn.Linear`` or Hugging Face ``Conv1D`` (on the device and in the dtype to
            time); every candidate multiplies by its ``(out, in)`` view (a ``Conv1D``'s transpose).
        x: ``(tokens, in_features)`` input.
        fmt: ``"bsr"`` or ``"2:4"``.
        blocksize: BSR block shape.

    Returns:
        ``{name: fn}``; a torch peer that cannot be built is a callable raising why, which
        :func:`check_candidates` reports.

    Raises:
        TypeError: if ``linear`` is not a linear layer.
    """
    kind = linear_kind(linear)
    if kind is None:
        raise TypeError(f"linear must be an nn.Linear or a Hugging Face Conv1D, got {type(linear).__name__}")
    weight, bias = kind.as_matrix(linear.weight.detach()), linear.bias
    sparse = SparseLinear.from_dense(linear, format=fmt, blocksize=blocksize or 1)
    fns: dict[str, Callable[[], Tensor]] = {DENSE: lambda: F.linear(x, weight, bias), SPARSE: lambda: sparse(x)}
    if x.is_cuda:
        kernel = bsr_linear if fmt == "bsr" else sparse24_linear
        fns[kernel.__name__] = lambda: kernel(x, sparse.sparse_weight(), bias, skip_checks=True)
        peer_name, peer = ("torch bsr_dense_mm", _torch_bsr_mm) if fmt == "bsr" else ("torch semi-structured", None)
        try:
            fns[peer_name] = peer(sparse, x) if peer is not None else _torch_semi_structured(weight, bias, x)
        except Exception as err:  # a missing backend must not hide the other rows
            fns[peer_name] = _raiser(err)
    return fns


def conv_candidates(conv: nn.Conv2d, x: Tensor, blocksize: tuple[int, int]) -> dict[str, Callable[[], Tensor]]:
    """Callables computing ``conv(x)``: the dense layer and :class:`SparseConv2d` (stored in ``blocksize`` blocks)."""
    sparse = SparseConv2d.from_dense(conv, blocksize=blocksize)
    return {DENSE_CONV: lambda: conv(x), SPARSE_CONV: lambda: sparse(x)}


def _raiser(err: Exception) -> Callable[[], Tensor]:
    def fn() -> Tensor:
        raise err

    return fn


@torch.inference_mode()
def check_candidates(
    fns: dict[str, Callable[[], Tensor]], reference: str = DENSE, rtol: float = 1e-3, atol: float = 1e-3
) -> tuple[dict[str, Callable[[], Tensor]], dict[str, str]]:
    """Splits ``fns`` into those whose output matches ``fns[reference]()`` and reasons for the others."""
    expected = fns[reference]().float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    good, bad = {}, {}
    for name, fn in fns.items():
        try:
            error = (fn().float() - expected).abs().max().item() if expected.numel() else 0.0
        except Exception as err:  # report and go on
            bad[name] = _describe(err)
            continue
        if error > atol + rtol * scale:
            bad[name] = f"wrong result: max abs error {error:.3g}"
        else:
            good[name] = fn
    return good, bad


def _time_cuda(fns: dict[str, Callable[[], object]], warmup: float, rep: float) -> dict[str, float]:
    import triton.testing

    return {name: triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") for name, fn in fns.items()}


def _time_cpu(fns: dict[str, Callable[[], object]], warmup: float, rep: float) -> dict[str, float]:
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for name, fn in fns.items()}
    numbers = {}
    for name, fn in fns.items():
        start, calls = time.perf_counter(), 0
        while calls == 0 or (time.perf_counter() - start) * 1e3 < warmup:
            fn()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        numbers[name] = max(1, int(1e-3 / max(per_call, 1e-7)))  # blocks of about 1 ms
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    rounds = 0
    while rounds < 3 or (min(spent.values()) * 1e3 < rep and rounds < 10_000):
        for name, timer in timers.items():  # alternate: a slow spell of the machine hits every candidate
            per_call = timer.timeit(numbers[name]).median
            samples[name].append(per_call)
            spent[name] += per_call * numbers[name]
        rounds += 1
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


@torch.inference_mode()
def time_calls(
    fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: float = 25.0, rep: float = 100.0
) -> dict[str, float]:
    """Median milliseconds per call of each function.

    Args:
        fns: ``{name: fn}``.
        device: ``"cuda"`` devices use ``triton.testing.do_bench``; others ``torch.utils.benchmark.Timer``.
        warmup: milliseconds of untimed calls per function.
        rep: milliseconds of timed calls per function (at least 3 rounds on CPU).
    """
    if not fns:
        return {}
    timer = _time_cuda if torch.device(device).type == "cuda" else _time_cpu
    return timer(fns, warmup, rep)
