"""Per-layer soft masks from a shared threshold node reproduce soft_topk's values and implicit gradient."""


import pytest
import torch

from lightning_sparse.core.patterns import Blocks, Unstructured
from lightning_sparse.core.soft_mask import (
    group_magnitudes,
    hard_topk,
    soft_topk_threshold,
    spartan_weight,
    straight_through_mask,
    threshold_node,
)
from lightning_sparse.core.soft_topk import soft_topk


@pytest.mark.parametrize("pattern", [Unstructured(), Blocks(2, 2)], ids=str)
def test_two_layers_sharing_one_budget_match_soft_topk(pattern):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 6, generator=generator, requires_grad=True),
               torch.randn(8, 4, generator=generator, requires_grad=True)]
    upstream = [torch.randn(w.shape, generator=generator) for w in weights]
    costs, density, beta = [1.0, 3.0], 0.3, 5.0
    scores = [group_magnitudes(w, pattern) for w in weights]
    flat_costs = torch.cat([torch.full_like(s, c) for s, c in zip(scores, costs, strict=True)]).detach()
    reference = soft_topk(torch.cat(scores), density, beta, costs=flat_costs)
    chunks = torch.split(reference, [s.numel() for s in scores])
    expected = [pattern.expand(c, w.shape) for c, w in zip(chunks, weights, strict=True)]
    loss = sum((w * m * g).sum() for w, m, g in zip(weights, expected, upstream, strict=True))
    expected_grads = torch.autograd.grad(loss, weights)

    threshold = soft_topk_threshold(torch.cat(scores).detach(), density, beta, flat_costs)
    node = threshold_node(weights, pattern, threshold, beta, costs)
    keep = [torch.rand(w.shape, generator=generator) < 0.5 for w in weights]  # any hard mask: passed straight through
    effective = [spartan_weight(w, pattern, node, beta, h, c) for w, h, c in zip(weights, keep, costs, strict=True)]
    for got, w, m, h in zip(effective, weights, expected, keep, strict=True):
        torch.testing.assert_close(got, torch.where(h, w * m, 0.0), rtol=1e-5, atol=1e-6)
    loss = sum((e * g).sum() for e, g in zip(effective, upstream, strict=True))
    for got, want in zip(torch.autograd.grad(loss, weights), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_threshold_node_serves_several_backwards():
    w = torch.randn(20, requires_grad=True)
    keep = hard_topk(w.detach().abs(), 0.5)
    node = threshold_node([w], Unstructured(), soft_topk_threshold(w.detach().abs(), 0.5, 4.0), 4.0)
    for _ in range(2):
        spartan_weight(w, Unstructured(), node, 4.0, keep).sum().backward()
    twice = w.grad.clone()
    w.grad = None
    spartan_weight(w, Unstructured(), node, 4.0, keep).sum().backward()
    torch.testing.assert_close(twice, 2 * w.grad)


def test_hard_topk_is_exact_and_cost_aware():
    scores = torch.tensor([5.0, 4.0, 4.0, 1.0, 3.0])
    assert hard_topk(scores, 0.4).tolist() == [True, True, False, False, False]  # ties: lower index
    tied = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(0)).float()
    for density in (0.0, 0.1, 0.37, 1.0):
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[torch.sort(tied, descending=True, stable=True).indices[: round(density * 1000)]] = True
        assert torch.equal(hard_topk(tied, density), expected)
    costs = torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0])  # unit values 1.25, 4, 4, 1, 3; budget 0.5 * 8 = 4
    assert hard_topk(scores, 0.5, costs).tolist() == [False, True, True, False, True]  # cost 3, closest to 4


def test_straight_through_mask_passes_or_masks_the_gradient():
    x = torch.arange(1.0, 5.0, requires_grad=True)
    keep, grad_keep = torch.tensor([True, False, False, True]), torch.tensor([True, True, False, True])
    out = straight_through_mask(x, keep)
    assert out.tolist() == [1.0, 0.0, 0.0, 4.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x.grad = None
    straight_through_mask(x, keep, grad_keep).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_float_keep_equals_bool_keep():
    w = torch.randn(6, 5, requires_grad=True)
    keep = hard_topk(w.detach().abs(), 0.4)
    node = threshold_node([w], Unstructured(), soft_topk_threshold(w.detach().abs(), 0.4, 3.0), 3.0)
    as_bool = spartan_weight(w, Unstructured(), node, 3.0, keep)
    as_float = spartan_weight(w, Unstructured(), node, 3.0, keep.float())
    torch.testing.assert_close(as_bool, as_float, rtol=0, atol=0)
    grads = [torch.autograd.grad(out.square().sum(), w)[0] for out in (as_bool, as_float)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_node_backward_reads_weights_changed_in_place_since_an_earlier_backward():
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(12, generator=generator, requires_grad=True) for _ in range(2))
    scores = torch.cat([a.detach().abs(), b.detach().abs()])
    threshold = soft_topk_threshold(scores, 0.5, 4.0)
    keep = torch.ones(12, dtype=torch.bool)
    node = threshold_node([a, b], Unstructured(), threshold, 4.0)
    both = spartan_weight(a, Unstructured(), node, 4.0, keep) + spartan_weight(b, Unstructured(), node, 4.0, keep)
    both.sum().backward()
    with torch.no_grad():
        b.mul_(1.5)  # an optimizer step: b's cached slope is stale
    a.grad = b.grad = None
    spartan_weight(a, Unstructured(), node, 4.0, keep).square().sum().backward()  # b takes no part in the forward
    fresh_a, fresh_b = (t.detach().clone().requires_grad_() for t in (a, b))
    fresh = threshold_node([fresh_a, fresh_b], Unstructured(), threshold, 4.0)
    spartan_weight(fresh_a, Unstructured(), fresh, 4.0, keep).square().sum().backward()
    torch.testing.assert_close(b.grad, fresh_b.grad, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, fresh_a.grad, rtol=0, atol=0)


def test_straight_through_mask_takes_bool_or_float_masks_alike():
    x = torch.randn(5, 7, requires_grad=True)
    keep, grad_keep = torch.rand(5, 7) < 0.3, torch.rand(5, 7) < 0.6
    results = []
    for masks in ((keep, grad_keep), (keep.float(), grad_keep.float())):
        out = straight_through_mask(x, *masks)
        results.append((out, torch.autograd.grad(out.square().sum() + out.sum(), x)[0]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_slope_cache_serves_the_node_and_keeps_one_entry_per_weight():
    w = torch.nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(2)))
    node = threshold_node([w], Unstructured(), soft_topk_threshold(w.detach().abs(), 0.3, 4.0), 4.0)
    keep = hard_topk(w.detach().abs(), 0.3).float()
    for _ in range(3):  # three optimizer steps under one node (update_every > 1)
        spartan_weight(w, Unstructured(), node, 4.0, keep).sum().backward()
        assert node.slope_cache.find(w) is not None  # the layer's backward left sign(w) * s for this version
        with torch.no_grad():
            w.add_(0.01)
        assert node.slope_cache.find(w) is None  # stale after the step
    assert len(node.slope_cache) == 1
