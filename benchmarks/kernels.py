"""Sparse linear kernels vs dense and vs torch's own sparse kernels, measured side by side in one run.

On CUDA (fp16, 4096x4096 weight, 10% of its 32x32 blocks kept; 16 and 4096 tokens; 2:4 at 16 tokens):
dense ``F.linear``, our ``bsr_linear``, torch's ``torch.sparse._triton_ops.bsr_dense_mm``, our
``sparse24_linear`` and torch's ``to_sparse_semi_structured``, timed with ``triton.testing.do_bench``.
Every output is checked against the dense result before it is timed.

Without CUDA: torch's CPU sparse BSR matmul vs dense at fp32 for the same 10%-dense 32x32-block weight.

Run: ``python benchmarks/kernels.py``.
"""

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_sparse.formats import bsr_to_torch, dense_to_bsr, dense_to_sparse24
from lightning_sparse.nn import SparseLinear

N = K = 4096
BLOCK = 32
DENSITY = 0.1


def block_sparse_weight(dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random (N, K) weight keeping exactly round(DENSITY * #blocks) random BLOCK x BLOCK blocks."""
    blocks = (N // BLOCK) * (K // BLOCK)
    keep = torch.zeros(blocks, dtype=torch.bool)
    keep[torch.randperm(blocks)[: round(DENSITY * blocks)]] = True
    mask = keep.reshape(N // BLOCK, K // BLOCK).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return (torch.randn(N, K) * mask).to(device=device, dtype=dtype)


def sparse_24_weight(dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random (N, K) weight keeping 2 random entries of every 4 along K."""
    keep = torch.rand(N, K // 4, 4).argsort(dim=-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, K)
    return (torch.randn(N, K) * mask).to(device=device, dtype=dtype)


def report(title: str, times: dict[str, float | str], dense: str, peers: dict[str, str]) -> None:
    """Prints each timing with its speedup over ``dense`` and over its torch peer (``peers[name]``)."""
    print(f"\n{title}")
    for name, ms in times.items():
        if isinstance(ms, str):
            print(f"  {name:<34} unavailable: {ms}")
            continue
        line = f"  {name:<34} {ms:9.4f} ms   {times[dense] / ms:6.2f}x vs dense"
        peer = times.get(peers.get(name, ""))
        if isinstance(peer, float):
            line += f"   {peer / ms:6.2f}x vs {peers[name]}"
        print(line)


def describe(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"


def attempt(fn: Callable[[], torch.Tensor], expected: torch.Tensor, bench: Callable) -> float | str:
    """Times ``fn`` after checking its output against ``expected``; a failure becomes its message."""
    try:
        torch.testing.assert_close(fn().float(), expected.float(), atol=0.1, rtol=0.05)
        return bench(fn)
    except Exception as err:  # report and go on: a missing backend must not hide the other rows
        return describe(err)


def run_cuda() -> None:
    import triton.testing
    from torch.sparse import _triton_ops, to_sparse_semi_structured

    from lightning_sparse.kernels import bsr_linear, sparse24_linear

    def bench(fn: Callable) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    dtype = torch.float16
    weight = block_sparse_weight(dtype, "cuda")
    ours, theirs = dense_to_bsr(weight, BLOCK), bsr_to_torch(dense_to_bsr(weight, BLOCK))
    for tokens in (16, 4096):
        x = torch.randn(tokens, K, device="cuda", dtype=dtype)
        y = F.linear(x, weight)
        times = {
            "dense F.linear": bench(lambda x=x: F.linear(x, weight)),
            "torch bsr_dense_mm": attempt(lambda x=x: _triton_ops.bsr_dense_mm(theirs, x.T).T, y, bench),
            "ours bsr_linear": attempt(lambda x=x: bsr_linear(x, ours), y, bench),
        }
        title = f"BSR {BLOCK}x{BLOCK}, density {DENSITY}, fp16, {tokens} tokens, weight {N}x{K}"
        report(title, times, "dense F.linear", {"ours bsr_linear": "torch bsr_dense_mm"})

    weight_24 = sparse_24_weight(dtype, "cuda")
    compressed = dense_to_sparse24(weight_24)
    x = torch.randn(16, K, device="cuda", dtype=dtype)
    y = F.linear(x, weight_24)
    try:
        semi = to_sparse_semi_structured(weight_24)
        semi_time = attempt(lambda: F.linear(x, semi), y, bench)
    except Exception as err:  # no cuSPARSELt/CUTLASS for this GPU or build
        semi_time = describe(err)
    times = {
        "dense F.linear": bench(lambda: F.linear(x, weight_24)),
        "torch to_sparse_semi_structured": semi_time,
        "ours sparse24_linear": attempt(lambda: sparse24_linear(x, compressed), y, bench),
    }
    peers = {"ours sparse24_linear": "torch to_sparse_semi_structured"}
    report(f"2:4, fp16, 16 tokens, weight {N}x{K}", times, "dense F.linear", peers)


def run_cpu() -> None:
    from torch.utils import benchmark

    def bench(fn: Callable) -> float:
        return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3

    print("No CUDA device: the Triton kernels and torch's GPU sparse kernels cannot run here.")
    print(f"CPU comparison instead: SparseLinear and torch's sparse BSR (MKL) vs dense, fp32, "
          f"{torch.get_num_threads()} threads.")
    weight = block_sparse_weight(torch.float32, "cpu")
    theirs = bsr_to_torch(dense_to_bsr(weight, BLOCK))
    module = SparseLinear.from_dense(weight, format="bsr", blocksize=BLOCK)
    for tokens in (16, 256):
        x = torch.randn(tokens, K)
        y = F.linear(x, weight)
        times = {
            "dense F.linear": bench(lambda x=x: F.linear(x, weight)),
            "torch BSR F.linear": attempt(lambda x=x: F.linear(x, theirs), y, bench),
            "torch BSR (W @ x^T)^T": attempt(lambda x=x: (theirs @ x.T).T, y, bench),
            "SparseLinear (block gather)": attempt(lambda x=x: module(x), y, bench),
        }
        title = f"BSR {BLOCK}x{BLOCK}, density {DENSITY}, fp32 CPU, {tokens} tokens, weight {N}x{K}"
        report(title, times, "dense F.linear", {"SparseLinear (block gather)": "torch BSR (W @ x^T)^T"})
    print(f"\nideal ratio vs dense at density {DENSITY}: about {1 / DENSITY:.0f}x (FLOPs and weight bytes both scale)")


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        run_cuda() if torch.cuda.is_available() else run_cpu()
    print(f"\ntotal {math.ceil(time.perf_counter() - start)} s")


if __name__ == "__main__":
    main()
