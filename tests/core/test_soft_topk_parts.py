"""Spartan's solve and backward on parts of a budget (FSDP2 shards) equal the whole computation."""

import math
import threading

import pytest
import torch

from lightning_sparse.core.patterns import Blocks, Unstructured
from lightning_sparse.core.soft_mask import (
    finish_partial_backward,
    group_magnitudes,
    spartan_partial_backward,
    spartan_weight,
    threshold_node,
)
from lightning_sparse.core.soft_topk_solve import RTOL, solve


class ThreadSum:
    """A ``reduce`` for parts solved in threads at once: every call returns the sum of every part's call."""

    def __init__(self, parts: int) -> None:
        self.barrier, self.parts, self.lock = threading.Barrier(parts), parts, threading.Lock()
        self.calls = 0
        self.total = None

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.total = values.clone() if self.total is None else self.total + values
        self.barrier.wait()
        result = self.total.clone()
        if self.barrier.wait() == 0:  # every part has read it
            self.total = None
            self.calls += 1
        self.barrier.wait()
        return result


def _scores(n=5000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).abs()


def test_one_part_with_an_identity_reduce_is_the_plain_solve_bit_for_bit():
    u, extremes = _scores(), None
    extremes = tuple(torch.aminmax(u)[i].item() for i in (0, 1))
    for density, beta in [(0.1, 20.0), (0.7, 3.0), (0.02, 400.0)]:
        plain = solve(u, None, density, beta, RTOL[u.dtype], 0.5, extremes)[0]
        assert solve(u, None, density, beta, RTOL[u.dtype], 0.5, extremes, lambda v: v.clone())[0] == plain


@pytest.mark.parametrize("density, beta", [(0.1, 20.0), (0.6, 5.0), (0.01, 300.0)])
def test_parts_solved_together_meet_the_whole_budget(density, beta):
    u = _scores()
    parts, reduce = torch.split(u, [1700, 3300]), ThreadSum(2)
    extremes = (u.min().item(), u.max().item())
    thresholds = [None, None]

    def run(i):
        thresholds[i] = solve(parts[i], None, density, beta, RTOL[u.dtype], 1.0, extremes, reduce)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert thresholds[0] == thresholds[1] and reduce.calls >= 3  # the same steps on every part
    kept = torch.sigmoid(beta * (u.double() - thresholds[0])).sum().item()
    assert abs(kept - density * u.numel()) <= 1.01 * RTOL[u.dtype] * density * u.numel()
    whole = solve(u, None, density, beta, RTOL[u.dtype])[0]
    slope = (lambda m: (m * (1 - m)).sum().item())(torch.sigmoid(beta * (u.double() - whole)))
    assert abs(thresholds[0] - whole) <= 3 * RTOL[u.dtype] * density * u.numel() / (beta * slope)


def test_a_reduced_solve_needs_the_guess_and_the_extremes():
    with pytest.raises(ValueError, match=r"solve\(reduce=...\) needs the guess and the extremes over every part, "
                                         r"got guess=None, extremes=\(0.0, 1.0\)"):
        solve(_scores(), None, 0.5, 1.0, 1e-6, None, (0.0, 1.0), lambda v: v)


@pytest.mark.parametrize("pattern", [Unstructured(), Blocks(2, 2)], ids=str)
def test_row_parts_of_a_budget_give_the_threshold_nodes_gradient(pattern):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 4, generator=generator), torch.randn(8, 6, generator=generator)]
    upstream = [torch.randn(w.shape, generator=generator) for w in weights]
    costs, beta, threshold = [1.0, 2.0], 4.0, 0.6
    leaves = [w.clone().requires_grad_() for w in weights]
    node = threshold_node(leaves, pattern, threshold, beta, costs)
    keep = [torch.ones(w.shape, dtype=torch.bool) for w in weights]
    effective = [spartan_weight(w, pattern, node, beta, h, c) for w, h, c in zip(leaves, keep, costs, strict=True)]
    expected = torch.autograd.grad(effective, leaves, upstream)
    parts = []  # two row parts of each weight (2 and 4 rows of the first, 4 and 4 of the second)
    for w, g, c, cut in zip(weights, upstream, costs, (2, 4), strict=True):
        for rows in (slice(0, cut), slice(cut, None)):
            parts.append(spartan_partial_backward(w[rows], g[rows], pattern, torch.tensor(threshold), beta, c) + (c,))
    grad_t = sum(p[2].double() for p in parts)
    slope = sum(p[4] * p[3] for p in parts)
    got = [finish_partial_backward(p[0], p[1], grad_t, slope, pattern) for p in parts]
    for i, want in enumerate(expected):
        torch.testing.assert_close(torch.cat(got[2 * i: 2 * i + 2]), want, rtol=1e-5, atol=1e-6)


def test_partial_backward_direct_part_is_the_gradient_with_the_threshold_held():
    w, g = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)), torch.ones(4, 4)
    leaf = w.clone().requires_grad_()
    values = torch.sigmoid(3.0 * (group_magnitudes(leaf, Unstructured()) - 0.5)).reshape(4, 4)
    (want,) = torch.autograd.grad(leaf * values, leaf, g)
    direct, _, grad_t, slope = spartan_partial_backward(w, g, Unstructured(), 0.5, 3.0)
    torch.testing.assert_close(direct, want)
    m = values.detach()
    assert math.isclose(grad_t.item(), -3.0 * (w * m * (1 - m)).sum().item(), rel_tol=1e-5)  # dL/dt = -beta g.w.s
    assert math.isclose(slope.item(), (m * (1 - m)).double().sum().item(), rel_tol=1e-6)
