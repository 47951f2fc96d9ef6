"""``to_sparse_inference``: swap a model's dense-with-zeros linear and ``nn.Conv2d`` layers for sparse ones.

Linear layers are ``nn.Linear`` and Hugging Face ``Conv1D`` (:mod:`lightning_sparse.nn.eligible`); both become a
:class:`SparseLinear` holding the ``(out, in)`` view of the weight. :func:`inference_plan` says, for every candidate
layer, whether it converts or why it stays dense.
"""

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from lightning_sparse.formats.bsr import parse_blocksize
from lightning_sparse.nn.eligible import linear_kind, linear_unfit_reason, tied_reason, tied_weights
from lightning_sparse.nn.sparse_conv import SparseConv2d, conv_unfit_reason, slow_conv_reason
from lightning_sparse.nn.sparse_linear import SparseLinear
from lightning_sparse.targets import as_globs

__all__ = ["inference_plan", "to_sparse_inference"]

MHA_OUT_PROJ_REASON = "nn.MultiheadAttention.out_proj stays dense (MHA reads its weight directly)"


def _parse_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    if pattern == "2:4":
        return "2:4", None
    try:
        return "bsr", parse_blocksize(pattern)
    except ValueError:
        raise ValueError(f'pattern must be "RxC" blocks (e.g. "32x32") or "2:4", got {pattern!r}') from None


def _is_24(matrix: torch.Tensor) -> bool:
    return bool(((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(dim=-1) <= 2).all())


def _unfit_reason(layer: nn.Module, fmt: str, blocksize: tuple[int, int] | None) -> str | None:
    if isinstance(layer, nn.Conv2d):
        return conv_unfit_reason(layer, fmt, blocksize)
    reason = linear_unfit_reason(layer, fmt, blocksize)
    if reason is None and fmt == "2:4" and not _is_24(linear_kind(layer).as_matrix(layer.weight)):
        return "the weight is not 2:4 sparse"
    return reason


def _candidates(model: nn.Module) -> dict[str, str | None]:
    """Every linear layer and ``nn.Conv2d`` by name -> why it never converts (``None``: it may)."""
    out_projs = {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    tied = tied_weights(model)
    found = {}
    for name, module in model.named_modules():
        if linear_kind(module) is not None or isinstance(module, nn.Conv2d):
            found[name] = tied_reason(tied[name]) if name in tied else None
            found[name] = MHA_OUT_PROJ_REASON if name in out_projs else found[name]
    return found


def _matching(name: str, include: Sequence[str]) -> list[str]:
    return [g for g in include if fnmatchcase(name, g) or fnmatchcase(f"{name}.weight", g)]


def _dense_reason(layer: nn.Module, explicit: bool, min_sparsity: float) -> str | None:
    """Why a layer that fits is still not worth converting, or ``None``."""
    zeros = (layer.weight == 0).float().mean().item()
    if zeros < min_sparsity:
        return f"{zeros:.3f} of its weights are zero, below min_sparsity={min_sparsity}"
    return None if explicit or not isinstance(layer, nn.Conv2d) else slow_conv_reason(layer.weight)


@torch.no_grad()
def inference_plan(
    model: nn.Module,
    pattern: str = "32x32",
    include: Sequence[str] | str | None = None,
    min_sparsity: float = 0.0,
) -> dict[str, str | None]:
    """What :func:`to_sparse_inference` does with each linear layer and ``nn.Conv2d`` of ``model``, in module order.

    Args: as :func:`to_sparse_inference`.

    Returns:
        Module FQN -> ``None`` when the layer converts, else why it stays dense.

    Raises:
        ValueError: on a bad ``pattern`` or ``min_sparsity``, or an ``include`` glob matching no layer that fits.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = model[0].weight.data[:, 32:].zero_()
        >>> inference_plan(model, pattern="32x32")
        {'0': None, '2': 'shape (10, 64) is not divisible by the block 32x32'}
    """
    fmt, blocksize = _parse_pattern(pattern)
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    include = as_globs("include", include)
    unfit: dict[str, list[str]] = {g: [] for g in include or ()}  # per glob: why its matched layers do not fit
    plan: dict[str, str | None] = {}
    for name, never in _candidates(model).items():
        globs = None if include is None else _matching(name, include)
        if globs == []:
            plan[name] = "not matched by include"
            continue
        layer = model.get_submodule(name)
        reason = never or _unfit_reason(layer, fmt, blocksize)
        for g in globs or ():
            if reason is None:
                unfit.pop(g, None)
            elif g in unfit:
                unfit[g].append(f"{name!r}: {reason}")
        plan[name] = reason or _dense_reason(layer, bool(globs), min_sparsity)
    if unfit:
        glob, reasons = next(iter(unfit.items()))
        found = "; ".join(reasons) if reasons else "no nn.Linear, Hugging Face Conv1D or nn.Conv2d matched it"
        raise ValueError(f"include glob {glob!r} matched no layer that fits pattern {pattern!r}: {found}")
    return plan


def _sparse_module(layer: nn.Module, fmt: str, blocksize: tuple[int, int] | None) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d.from_dense(layer, blocksize=blocksize)
    return SparseLinear.from_dense(layer, format=fmt, blocksize=blocksize or 1)


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module,
    pattern: str = "32x32",
    include: Sequence[str] | str | None = None,
    min_sparsity: float = 0.0,
) -> nn.Module:
    """Replaces every eligible linear layer / ``nn.Conv2d`` of ``model`` in place with a sparse inference module.

    A linear layer (``nn.Linear``, or Hugging Face ``Conv1D`` whose ``(in, out)`` weight is read as its ``(out, in)``
    transpose) becomes :class:`SparseLinear`, computing the same function. It is eligible when its name matches
    ``include``, its ``(out, in)`` view fits the pattern (both dims divisible by the block; or ``in_features``
    divisible by 4 and at most 2 non-zeros per group of 4 inputs) and its fraction of zero weights is at least
    ``min_sparsity``.

    ``nn.Conv2d`` becomes :class:`SparseConv2d` under a block pattern (never ``"2:4"``) when it has ``groups=1``,
    ``padding_mode="zeros"``, a matrix view ``(out, in * kh * kw)`` divisible by the block, at least
    ``min_sparsity`` zeros and, unless an ``include`` glob names it, reads at most
    :data:`~lightning_sparse.nn.sparse_conv.MAX_USED_CHANNEL_FRACTION` of its input channels (above that it is
    not faster than dense, so it stays dense).

    Layers that do not fit are left dense, but every ``include`` glob must match at least one layer that fits (so a
    typo or a named layer that cannot convert raises). Outputs equal the dense-with-zeros model's within dtype
    tolerance. Always left dense: ``nn.MultiheadAttention.out_proj`` (MHA's forward calls ``F.linear`` on
    ``out_proj.weight`` directly instead of calling the submodule, so a swapped module would never run) and a layer
    whose weight is tied to another module (GPT-2's ``lm_head`` shares ``wte``'s weight: swapping it would untie
    them). :func:`inference_plan` gives the reason for every layer left dense.

    Args:
        model: the model with pruned (zero) weights; modified in place.
        pattern: ``"RxC"`` BSR blocks (e.g. ``"32x32"``, ``"16x64"``) or ``"2:4"``.
        include: FQN globs of the layers to convert, matched against the module name or ``<name>.weight``
            (``None``: every eligible layer).
        min_sparsity: convert only layers with at least this fraction of zero weights, in ``[0, 1]``.

    Returns:
        ``model`` (or the new module when ``model`` itself is an eligible layer).

    Raises:
        ValueError: on a bad ``pattern`` or ``min_sparsity``, or an ``include`` glob matching no layer that fits.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = model[0].weight.data[:, 32:].zero_()
        >>> model = to_sparse_inference(model, pattern="32x32")  # model[2]: 10 rows, not divisible, stays dense
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SparseLinear', 'Linear')
    """
    fmt, blocksize = _parse_pattern(pattern)
    plan = inference_plan(model, pattern, include, min_sparsity)  # checked before any swap: on error, untouched
    for name in [name for name, reason in plan.items() if reason is None]:
        sparse = _sparse_module(model.get_submodule(name), fmt, blocksize)
        if not name:
            return sparse
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, sparse)
    return model
