r"""Scores for dropping, growing and keeping weights; higher means more important.

All functions are pure: they read tensors and return a new float tensor of the weight's shape.

=======================  ========================================================
name                     score
=======================  ========================================================
magnitude                :math:`|w|`
gradient                 :math:`|g|`
momentum                 :math:`|m|` (SGD buffer) or :math:`|m / (\sqrt{v} + 10^{-8})|` (Adam)
snip                     :math:`|w \cdot g|`
mest                     :math:`|w| + \gamma |g|`
reciprocal_sensitivity   :math:`|w| / (|g| + 10^{-8})`
random                   uniform on [0, 1) from a seeded ``torch.Generator``
=======================  ========================================================

Example::

    >>> import torch
    >>> magnitude(torch.tensor([-2.0, 1.0])).tolist()
    [2.0, 1.0]
    >>> mest(torch.tensor([-2.0, 1.0]), torch.tensor([0.5, 3.0]), gamma=1.0).tolist()
    [2.5, 4.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RANDOM_CHUNK = 1 << 22  # elements drawn at once by random_rows (16 MB of float32)


def magnitude(weight: Tensor) -> Tensor:
    """:math:`|w|`."""
    return weight.detach().abs().float()


def gradient(grad: Tensor) -> Tensor:
    """:math:`|g|`, the dense gradient's magnitude (RigL growth)."""
    return grad.detach().abs().float()


def momentum(optimizer_state: dict) -> Tensor:
    """Magnitude of the optimizer's momentum: SGD ``momentum_buffer`` or Adam ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)``.

    Raises:
        ValueError: when the state holds neither (e.g. SGD without momentum, or before the first step).
    """
    if optimizer_state.get("momentum_buffer") is not None:
        return optimizer_state["momentum_buffer"].detach().abs().float()
    if "exp_avg" in optimizer_state and "exp_avg_sq" in optimizer_state:
        state = optimizer_state
        return (state["exp_avg"].float() / (state["exp_avg_sq"].float().sqrt() + 1e-8)).abs()
    raise ValueError(
        f"momentum scores need an optimizer with momentum (SGD momentum_buffer or Adam exp_avg/exp_avg_sq), "
        f"got optimizer state keys {sorted(optimizer_state)}"
    )


def snip(weight: Tensor, grad: Tensor) -> Tensor:
    """:math:`|w \\cdot g|` (connection sensitivity)."""
    return (weight.detach().float() * grad.detach().float()).abs()


def mest(weight: Tensor, grad: Tensor, gamma: float = 1.0) -> Tensor:
    """:math:`|w| + \\gamma |g|` (MEST; not invariant to the gradient's scale)."""
    return weight.detach().abs().float() + gamma * grad.detach().abs().float()


def reciprocal_sensitivity(weight: Tensor, grad: Tensor) -> Tensor:
    """:math:`|w| / (|g| + 10^{-8})`."""
    return weight.detach().abs().float() / (grad.detach().abs().float() + 1e-8)


def random(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random scores of ``like``'s shape drawn from ``generator`` (on the generator's device)."""
    values = torch.rand(like.shape, generator=generator, device=generator.device)
    return values.to(like.device)


def random_rows(shape: tuple[int, ...], generator: torch.Generator, start: int, stop: int,
                device: torch.device | str | None = None, chunk: int = RANDOM_CHUNK) -> Tensor:
    """Rows ``start:stop`` (dim 0) of :func:`random` scores of ``shape`` (on ``device``), leaving ``generator`` where
    drawing the whole tensor leaves it: every rank of a sharded layer gets its rows of one process's draws.

    A CPU generator draws one number per element in order, so the whole tensor is drawn in slabs of whole rows of
    about ``chunk`` elements and only rows ``start:stop`` are kept: memory is those rows plus one slab, time is the
    whole draw. Other generators draw the whole tensor at once.

    Example::

        >>> whole = random(torch.empty(5, 3), torch.Generator().manual_seed(0))
        >>> torch.equal(random_rows((5, 3), torch.Generator().manual_seed(0), 1, 3), whole[1:3])
        True
    """
    if generator.device.type != "cpu" or not shape:
        whole = torch.rand(shape, generator=generator, device=generator.device)
        return whole[start:stop].clone().to(device) if shape else whole.to(device)
    rows, row_size = shape[0], math.prod(shape[1:])
    step = max(1, chunk // max(row_size, 1))
    kept = []
    for first in range(0, rows, step):
        slab = torch.rand((min(step, rows - first), *shape[1:]), generator=generator)
        low, high = max(start, first) - first, min(stop, first + slab.shape[0]) - first
        if low < high:
            kept.append(slab[low:high].clone() if high - low < slab.shape[0] else slab)
    return (torch.cat(kept) if kept else torch.empty((0, *shape[1:]))).to(device)
