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

import torch
from torch import Tensor


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
