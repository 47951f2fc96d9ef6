r"""Masks for dense-weight training: Spartan's soft top-k mask rebuilt per layer, exact hard top-k, straight-through.

Spartan (Tai, Tian & Lim 2022, https://arxiv.org/abs/2205.14107) keeps dense weights :math:`w` and computes with

.. math::

    \tilde w = w \odot m \odot h, \qquad m_i = \sigma\big(\beta (u_i - t)\big), \qquad
    \sum_i c_i m_i = \rho \sum_i c_i,

where :math:`u_i = p_i / c_i` is the unit value of group :math:`i` (:math:`p_i` = mean :math:`|w|` of the block, or
:math:`|w_i|`; :math:`c_i` its cost), :math:`t` the soft top-k threshold (:func:`soft_topk_threshold`) and :math:`h`
the exact hard top-k (:func:`hard_topk`: the highest :math:`u`, so the highest :math:`m`). The gradient passes
:math:`h` straight through (pruned weights still learn) and differentiates :math:`m` implicitly, as
:func:`~lightning_sparse.core.soft_topk.soft_topk` does. Here :math:`t` is one shared node per budget
(:func:`threshold_node`, carrying the coupling term of the implicit gradient) and each layer computes its own
:math:`w \odot m \odot h` from it (:func:`spartan_weight`, one fused op): one solve per budget serves every layer
and every forward, and the gradient equals :func:`soft_topk`'s.

Example::

    >>> import torch
    >>> from lightning_sparse.core.patterns import Unstructured
    >>> w = torch.tensor([[0.5, -2.0], [0.1, 1.0]], requires_grad=True)
    >>> t = soft_topk_threshold(w.detach().abs(), 0.5, 10.0)
    >>> h = hard_topk(w.detach().abs(), 0.5)
    >>> effective = spartan_weight(w, Unstructured(), threshold_node([w], Unstructured(), t, 10.0), 10.0, h)
    >>> (effective != 0).int().tolist()
    [[0, 1], [0, 1]]
    >>> effective.sum().backward()
    >>> bool((w.grad != 0).all())  # pruned weights get gradients too
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sparse.core.masks import topk_flat
from lightning_sparse.core.patterns import Blocks, Pattern
from lightning_sparse.core.soft_topk import soft_topk_threshold
from lightning_sparse.core.soft_topk_solve import sum64_tensor

__all__ = ["finish_partial_backward", "group_magnitudes", "hard_topk", "soft_group_values", "soft_topk_threshold",
           "spartan_partial_backward", "spartan_weight", "straight_through_mask", "threshold_node"]


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, grad_keep: Tensor | None) -> Tensor:
        ctx.mark_non_differentiable(keep)
        ctx.masked = grad_keep is not None
        if ctx.masked:
            ctx.save_for_backward(grad_keep)
        return _apply_mask(x, keep)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.masked:
            (grad_keep,) = ctx.saved_tensors
            grad = _apply_mask(grad, grad_keep)
        return grad, None, None


def _apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` where ``keep`` and 0 elsewhere; ``keep`` is bool or 0/1 values (one multiply, for finite ``x``)."""
    return torch.where(keep, x, x.new_zeros(())) if keep.dtype == torch.bool else x * keep.to(x.dtype)


def straight_through_mask(x: Tensor, keep: Tensor, grad_keep: Tensor | None = None) -> Tensor:
    """``x`` where ``keep`` and 0 elsewhere; the gradient passes unmasked, or masked by ``grad_keep``.

    ``keep`` and ``grad_keep`` are bool, or 0/1 values (a multiply: faster, for finite ``x``)."""
    return _StraightThrough.apply(x, keep, grad_keep)


def _group_size(pattern: Pattern) -> int:
    return pattern.rows * pattern.cols if isinstance(pattern, Blocks) else 1


def group_magnitudes(weight: Tensor, pattern: Pattern) -> Tensor:
    """Mean :math:`|w|` of each group of ``pattern`` (flat, float32, differentiable)."""
    return pattern.group_scores(weight.abs().float())


def hard_topk(scores: Tensor, density: float, costs: Tensor | None = None) -> Tensor:
    """Exact hard top-k of the unit values ``scores / costs`` (bool, ``scores``' shape; ties: lower index kept).

    With equal (or no) costs it keeps exactly ``round(density * n)`` entries (a selection in O(n), no sort). With
    unequal costs it keeps the prefix, in descending unit value, whose total cost is closest to
    ``density * costs.sum()`` (the smaller prefix on a tie).
    """
    flat = scores.detach().reshape(-1).float()
    if costs is None or bool((costs == costs.reshape(-1)[0]).all()):
        return topk_flat(flat, round(density * flat.numel())).reshape(scores.shape)
    costs = costs.reshape(-1).to(flat.device)
    order = torch.sort(flat / costs, descending=True, stable=True).indices
    cumulative = torch.cumsum(costs[order].double(), 0)
    budget = density * cumulative[-1].item()
    index = int(torch.searchsorted(cumulative, budget))
    below = cumulative[index - 1].item() if index else 0.0
    keep = index + 1 if index < flat.numel() and cumulative[index].item() - budget < budget - below else index
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(scores.shape)


def soft_group_values(
    weight: Tensor, pattern: Pattern, threshold: Tensor | float, sharpness: float, cost: float = 1.0
) -> Tensor:
    r"""Soft mask :math:`\sigma(\beta(u - t))` of ``weight``'s groups (flat, float32), ``u = mean |w| / cost``."""
    unit = group_magnitudes(weight, pattern)
    if isinstance(threshold, Tensor):
        offset = (threshold * -sharpness).to(unit)
    else:
        offset = torch.full((), -threshold * sharpness, dtype=unit.dtype, device=unit.device)
    return torch.add(offset, unit, alpha=sharpness / cost, out=unit).sigmoid_()  # one pass for the logits


class _SlopeCache(dict):
    """Per weight of a budget: ``sign(w) * s`` expanded to the weight and ``sum(s)``, stored by the layer's backward
    for the threshold node's backward. One entry per weight, valid for the weight's version it was computed at, so an
    optimizer step invalidates it (and the next backward replaces it: the cache never grows past one per weight)."""

    def put(self, weight: Tensor, signed_slope: Tensor, total: Tensor) -> None:
        self[id(weight)] = (weight._version, signed_slope, total)

    def find(self, weight: Tensor) -> tuple[Tensor, Tensor] | None:
        entry = self.get(id(weight))
        return None if entry is None or entry[0] != weight._version else entry[1:]


class _SpartanWeight(torch.autograd.Function):
    """``w * m * keep`` with ``m = sigmoid(beta (mean|w| / cost - t))``; ``keep`` (0/1 floats) passes straight
    through. Saves the weight and the group values ``m``; the backward leaves ``sign(w) * s`` for the threshold."""

    @staticmethod
    def forward(ctx, weight: Tensor, threshold: Tensor, pattern: Pattern, sharpness: float, cost: float, keep: Tensor):
        values = soft_group_values(weight, pattern, threshold, sharpness, cost)
        ctx.save_for_backward(weight, values)
        ctx.pattern, ctx.sharpness, ctx.cost = pattern, sharpness, cost
        ctx.cache = getattr(threshold, "slope_cache", None)
        scaled = weight * pattern.expand(values, weight.shape).to(weight.dtype)
        return scaled.mul_(keep.to(weight.dtype)) if keep.dtype != torch.bool else scaled.masked_fill_(~keep, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, values = ctx.saved_tensors
        grad_weight, grad_threshold, signed_slope, slope = _weight_backward(
            weight, values, grad, ctx.pattern, ctx.sharpness, ctx.cost, ctx.needs_input_grad[1])
        if ctx.cache is not None:
            ctx.cache.put(weight, signed_slope, sum64_tensor(slope))
        return grad_weight, grad_threshold, None, None, None, None


def _weight_backward(
    weight: Tensor, values: Tensor, grad: Tensor, pattern: Pattern, beta: float, cost: float, with_threshold: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``w * m * keep``'s backward with the threshold held: dL/dw through ``w`` and ``m``, dL/dt (when asked), and
    ``sign(w) * s`` expanded and the group slopes ``s`` (for the threshold's own backward)."""
    signed_slope, slope = _signed_slope_of(weight, values, pattern)
    grad_values = pattern.group_scores((grad * weight).float())  # dL/dm per group, over the group size
    grad_threshold = -beta * _group_size(pattern) * torch.dot(grad_values, slope) if with_threshold else None
    grad_weight = grad * pattern.expand(values, weight.shape).to(grad.dtype)
    per_weight = pattern.expand(grad_values.mul_(beta / cost), weight.shape)  # dL/d|w| over s
    grad_weight.addcmul_(signed_slope, per_weight.to(grad.dtype))
    return grad_weight, grad_threshold, signed_slope, slope


@torch.no_grad()
def spartan_partial_backward(
    weight: Tensor, grad: Tensor, pattern: Pattern, threshold: Tensor | float, sharpness: float, cost: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r""":func:`spartan_weight`'s backward on one part of a budget (e.g. one rank's rows of its weights), given
    ``grad`` = dL/d(effective weight) of those rows.

    Returns ``(direct, signed_slope, grad_threshold, slope_sum)``: the gradient with the threshold held, ``sign(w) *
    s`` expanded to the weight, this part's :math:`\partial L / \partial t` (float32) and :math:`\sum s` (float64).
    The whole gradient of these rows is ``direct + signed_slope * G / S / group size``, with :math:`G` the sum of
    ``grad_threshold`` and :math:`S` the sum of ``cost * slope_sum`` over every part and layer of the budget: what
    :func:`threshold_node`'s backward adds (:func:`finish_partial_backward`).
    """
    values = soft_group_values(weight, pattern, threshold, sharpness, cost)
    direct, grad_threshold, signed_slope, slope = _weight_backward(weight, values, grad, pattern, float(sharpness),
                                                                   float(cost), True)
    return direct, signed_slope, grad_threshold, sum64_tensor(slope)


def finish_partial_backward(direct: Tensor, signed_slope: Tensor, grad_threshold: Tensor, slope_total: Tensor,
                            pattern: Pattern) -> Tensor:
    """The whole gradient of one part from :func:`spartan_partial_backward`'s ``direct`` and ``signed_slope``, the
    budget's summed ``grad_threshold`` and summed ``cost * slope_sum`` (``threshold_node``'s backward, same steps)."""
    scale = grad_threshold.double() / slope_total.clamp_min(torch.finfo(torch.float64).tiny) / _group_size(pattern)
    return direct.add_(signed_slope.mul(scale.to(signed_slope.dtype)))


def _signed_slope_of(weight: Tensor, values: Tensor, pattern: Pattern) -> tuple[Tensor, Tensor]:
    """``sign(w) * s`` expanded to the weight, and the group slopes ``s = m (1 - m)`` of the group values ``m``."""
    slope = torch.addcmul(values, values, values, value=-1)
    return weight.sign().mul_(pattern.expand(slope, weight.shape).to(weight.dtype)), slope


def spartan_weight(
    weight: Tensor, pattern: Pattern, threshold: Tensor, sharpness: float, keep: Tensor, cost: float = 1.0
) -> Tensor:
    r"""Spartan's effective weight :math:`w \odot m \odot h` (``h`` = ``keep``, bool or 0/1 floats), differentiable
    in ``weight`` (through :math:`w` and :math:`m`, ``keep`` passed straight through) and in a
    :func:`threshold_node` ``threshold``."""
    return _SpartanWeight.apply(weight, threshold, pattern, float(sharpness), float(cost), keep)


class _Threshold(torch.autograd.Function):
    """The soft top-k threshold as a function of every weight of the budget (implicit gradient).

    It saves no tensors with ``save_for_backward``, so one node serves several forwards and backwards (gradient
    accumulation, re-entrant checkpointing); its backward reads the weights as they are (unchanged until the
    optimizer steps), taking ``sign(w) * s`` from the layers' backward when they left it in the slope cache.
    """

    @staticmethod
    def forward(ctx, threshold: Tensor, pattern: Pattern, sharpness: float, costs: Sequence[float], cache, *weights):
        ctx.threshold, ctx.pattern, ctx.sharpness = threshold, pattern, sharpness
        ctx.costs, ctx.weights, ctx.cache = costs, weights, cache
        return threshold.clone()

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad: Tensor):
        slopes = [_signed_slope(ctx, weight, cost) for weight, cost in zip(ctx.weights, ctx.costs, strict=True)]
        total = sum(cost * total for cost, (_, total) in zip(ctx.costs, slopes, strict=True))
        scale = grad.double() / total.clamp_min(torch.finfo(torch.float64).tiny) / _group_size(ctx.pattern)
        grads = [signed.mul(scale.to(signed.dtype)) for signed, _ in slopes]
        return (None, None, None, None, None, *grads)


def _signed_slope(ctx, weight: Tensor, cost: float) -> tuple[Tensor, Tensor]:
    """``sign(w) * s`` expanded to the weight and ``sum(s)`` (float64), from the cache or recomputed."""
    cached = ctx.cache.find(weight)
    if cached is not None:
        return cached
    values = soft_group_values(weight, ctx.pattern, ctx.threshold, ctx.sharpness, cost)
    signed, slope = _signed_slope_of(weight, values, ctx.pattern)
    return signed, sum64_tensor(slope)


def threshold_node(
    weights: Sequence[Tensor],
    pattern: Pattern,
    threshold: float,
    sharpness: float,
    costs: Sequence[float] | None = None,
) -> Tensor:
    r"""A 0-d float32 tensor holding ``threshold`` whose gradient flows to ``weights`` as
    :math:`\partial t / \partial p_j = s_j / \sum_i c_i s_i` (:math:`s = m (1 - m)`, :math:`p_j` = mean :math:`|w|`
    of group :math:`j`): the budget's coupling term of the soft top-k gradient.

    Args:
        weights: every weight of the budget (one layer, or all layers of a global budget).
        pattern: the grouping (unstructured or blocks).
        threshold: the solved threshold (:func:`soft_topk_threshold` on the concatenated mean magnitudes).
        sharpness: :math:`\beta`.
        costs: cost of each group of each weight (one number per weight); ``None`` means ones.
    """
    costs = [1.0] * len(weights) if costs is None else [float(c) for c in costs]
    value = torch.tensor(threshold, dtype=torch.float32, device=weights[0].device)
    cache = _SlopeCache()
    node = _Threshold.apply(value, pattern, float(sharpness), costs, cache, *weights)
    node.slope_cache = cache
    return node
