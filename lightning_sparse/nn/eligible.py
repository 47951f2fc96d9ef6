"""Which layers can become sparse inference modules: linear layers of any stored layout, their fit, tied weights.

A *linear* layer computes ``x W^T + b`` with ``W`` its ``(out, in)`` matrix view (:mod:`lightning_sparse.layers`):
``nn.Linear`` (stored ``(out, in)``) and Hugging Face ``Conv1D`` (GPT-2; stored ``(in, out)``, so ``W`` is the
transpose). Either becomes a :class:`~lightning_sparse.nn.SparseLinear` holding ``W``; both dims and N:M groups are
read on ``W``, so 2:4 runs along the input dimension (dim 0 of a ``Conv1D`` weight). A layer whose weight is shared
with another module (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``) is never converted: swapping one of its
modules would untie it.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    >>> model[1].weight = model[0].weight  # tied, as a language model's head
    >>> linear_kind(model[1]).name, tied_weights(model)
    ('Linear', {'0': ['1.weight'], '1': ['0.weight']})
    >>> linear_unfit_reason(nn.Linear(6, 4), "2:4", None)
    'in_features 6 is not divisible by 4'
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_sparse.layers import HF_CONV1D, LayerKind, layer_kind, parameter_aliases

__all__ = ["describe_view", "linear_kind", "linear_unfit_reason", "tied_reason", "tied_weights"]


def linear_kind(module: nn.Module) -> LayerKind | None:
    """The layer kind of ``module`` when it is a linear layer (``nn.Linear`` or HF ``Conv1D``), else ``None``."""
    kind = layer_kind(module)
    if kind is None or kind.weights != ("weight",) or module._parameters.get("weight") is None:
        return None
    return kind if isinstance(module, nn.Linear) or kind == HF_CONV1D else None


def describe_view(kind: LayerKind, shape: Sequence[int]) -> str:
    """``"shape (N, K)"`` for a weight stored as its ``(out, in)`` view, else naming the kind, layout and view."""
    n, k = kind.matrix_shape(shape)
    if not kind.transposed and tuple(shape) == (n, k):
        return f"shape ({n}, {k})"
    return f"{kind.name} weight stored as {tuple(shape)}, (out, in) view ({n}, {k})"


def linear_unfit_reason(module: nn.Module, fmt: str, blocksize: tuple[int, int] | None) -> str | None:
    """Why the ``(out, in)`` view of linear layer ``module`` does not fit format ``fmt`` (``"bsr"`` with
    ``blocksize`` blocks, or ``"2:4"``), from its shape alone; ``None`` if it fits."""
    kind = linear_kind(module)
    shape = tuple(module.weight.shape)
    (n, k), where = kind.matrix_shape(shape), describe_view(kind, shape)
    if fmt == "bsr" and (n % blocksize[0] or k % blocksize[1]):
        return f"{where} is not divisible by the block {blocksize[0]}x{blocksize[1]}"
    if fmt == "2:4" and k % 4:
        prefix = "" if where.startswith("shape") else f"{where}: "
        return f"{prefix}in_features {k} is not divisible by 4"
    return None


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Module FQN -> the other FQNs of its ``weight``, for every module whose ``weight`` is shared (tied)."""
    aliases = {fqn: group for group in parameter_aliases(model).values() for fqn in group}
    tied = {}
    for name, module in model.named_modules():
        own = f"{name}.weight" if name else "weight"
        others = [fqn for fqn in aliases.get(own, ()) if fqn != own]
        if module._parameters.get("weight") is not None and others:
            tied[name] = others
    return tied


def tied_reason(others: Sequence[str]) -> str:
    """Why a layer with a tied weight stays dense."""
    names = ", ".join(map(repr, others))
    return f"its weight is tied to {names}: tied weights stay dense (converting would untie them)"
