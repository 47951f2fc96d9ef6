"""Time soft_topk's forward against torch.kthvalue and torch.topk at k = 10% on the same tensor, in one run.

Run: ``python benchmarks/soft_topk.py [--numel 25000000] [--repeats 5]``. Prints medians and the ratios
soft_topk / kthvalue (project target: <= 3) and soft_topk / topk, plus the budget error of the soft mask.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_sparse.core.soft_topk import soft_topk


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--sharpness", type=float, default=10.0)
    args = parser.parse_args()

    scores = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    k = int(args.density * args.numel)
    timings = {
        "soft_topk": median_seconds(lambda: soft_topk(scores, args.density, args.sharpness), args.repeats),
        "kthvalue": median_seconds(lambda: torch.kthvalue(scores, args.numel - k + 1), args.repeats),
        "topk": median_seconds(lambda: torch.topk(scores, k, sorted=False), args.repeats),
    }
    mask = soft_topk(scores, args.density, args.sharpness)
    budget_error = abs(mask.double().sum().item() - args.density * args.numel) / (args.density * args.numel)

    print(f"numel={args.numel} density={args.density} sharpness={args.sharpness} threads={torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"  {name:<10} median {seconds * 1e3:8.1f} ms over {args.repeats} repeats")
    print(f"  soft_topk / kthvalue = {timings['soft_topk'] / timings['kthvalue']:.2f}x (target <= 3x)")
    print(f"  soft_topk / topk     = {timings['soft_topk'] / timings['topk']:.2f}x")
    print(f"  budget relative error = {budget_error:.2e}")


if __name__ == "__main__":
    main()
