"""Sparse-aware initial scale: give a masked layer the output variance of its dense initialization.

A unit with ``a`` active inputs out of ``n`` sums ``a`` random terms instead of ``n``: its pre-activation variance
shrinks by ``a / n``. Multiplying its initial weights by ``sqrt(n / a)`` restores it. This is the fan-in scaling of
Evci et al. 2022 ("Gradient Flow in Sparse Neural Networks and How Lottery Tickets Win",
https://arxiv.org/abs/2010.03533) and of fastsparse's ``sparse_init_mode="fan_in"``, applied to the weights the
model already has (their distribution is kept, only their scale changes).

Example::

    >>> import torch
    >>> weight = torch.ones(2, 4)
    >>> mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    >>> scale_to_active_fan_in_(weight, mask).tolist()
    [[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def scale_to_active_fan_in_(weight: Tensor, mask: Tensor) -> Tensor:
    """Multiply each output unit's weights (``weight[i]``) by ``sqrt(fan_in / active fan_in)`` in place.

    Args:
        weight: ``(out, ...)`` weight; every dimension after the first is the unit's fan-in (conv kernels included).
        mask: bool mask of ``weight``'s shape. Units with no active input are left as they are.

    Returns:
        ``weight``.

    Raises:
        ValueError: when ``mask`` does not have ``weight``'s shape.
    """
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if weight.dim() < 2:
        return weight
    rows = mask.reshape(weight.shape[0], -1)
    active = torch.count_nonzero(rows, dim=1).to(torch.float32)
    scale = torch.where(active > 0, (rows.shape[1] / active.clamp_min(1)).sqrt(), torch.ones_like(active))
    return weight.mul_(scale.to(weight.device, weight.dtype).view(-1, *([1] * (weight.dim() - 1))))
