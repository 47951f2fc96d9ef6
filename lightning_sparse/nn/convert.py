"""``to_sparse_inference``: swap a model's dense-with-zeros ``nn.Linear`` / ``nn.Conv2d`` layers for sparse ones."""

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from lightning_sparse.formats.bsr import parse_blocksize
from lightning_sparse.nn.sparse_conv import SparseConv2d, conv_unfit_reason, slow_conv_reason
from lightning_sparse.nn.sparse_linear import SparseLinear

__all__ = ["to_sparse_inference"]


def _parse_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    if pattern == "2:4":
        return "2:4", None
    try:
        return "bsr", parse_blocksize(pattern)
    except ValueError:
        raise ValueError(f'pattern must be "RxC" blocks (e.g. "32x32") or "2:4", got {pattern!r}') from None


def _is_24(weight: torch.Tensor) -> bool:
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) <= 2).all())


def _unfit_reason(layer: nn.Module, fmt: str, blocksize: tuple[int, int] | None) -> str | None:
    if isinstance(layer, nn.Conv2d):
        return conv_unfit_reason(layer, fmt, blocksize)
    weight = layer.weight
    n, k = weight.shape
    if fmt == "bsr":
        r, c = blocksize
        return None if n % r == 0 and k % c == 0 else f"shape ({n}, {k}) is not divisible by the block {r}x{c}"
    if k % 4:
        return f"in_features {k} is not divisible by 4"
    return None if _is_24(weight) else "the weight is not 2:4 sparse"


def _convertible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` by name, except ``nn.MultiheadAttention.out_proj`` (MHA reads its
    weight directly)."""
    skipped = {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n not in skipped]


def _matching(name: str, include: Sequence[str]) -> list[str]:
    return [g for g in include if fnmatchcase(name, g) or fnmatchcase(f"{name}.weight", g)]


def _worth_converting(layer: nn.Module, explicit: bool, min_sparsity: float) -> bool:
    if (layer.weight == 0).float().mean().item() < min_sparsity:
        return False
    return explicit or not isinstance(layer, nn.Conv2d) or slow_conv_reason(layer.weight) is None


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
    """Replaces every eligible ``nn.Linear`` / ``nn.Conv2d`` of ``model`` in place with a sparse inference module.

    ``nn.Linear`` becomes :class:`SparseLinear`. It is eligible when its name matches ``include``, its weight fits
    the pattern (both dims divisible by the block; or ``in_features`` divisible by 4 and at most 2 non-zeros per
    group of 4) and its fraction of zero weights is at least ``min_sparsity``.

    ``nn.Conv2d`` becomes :class:`SparseConv2d` under a block pattern (never ``"2:4"``) when it has ``groups=1``,
    ``padding_mode="zeros"``, a matrix view ``(out, in * kh * kw)`` divisible by the block, at least
    ``min_sparsity`` zeros and, unless an ``include`` glob names it, reads at most
    :data:`~lightning_sparse.nn.sparse_conv.MAX_USED_CHANNEL_FRACTION` of its input channels (above that it is
    not faster than dense, so it stays dense).

    Layers that do not fit are left dense, but every ``include`` glob must match at least one layer that fits (so a
    typo or a named layer that cannot convert raises). Outputs equal the dense-with-zeros model's within dtype
    tolerance. ``nn.MultiheadAttention.out_proj`` is always left dense: MHA's forward calls ``F.linear`` on
    ``out_proj.weight`` directly instead of calling the submodule, so a swapped module would never run.

    Args:
        model: the model with pruned (zero) weights; modified in place.
        pattern: ``"RxC"`` BSR blocks (e.g. ``"32x32"``, ``"16x64"``) or ``"2:4"``.
        include: FQN globs of the layers to convert, matched against the module name or ``<name>.weight``
            (``None``: every eligible ``nn.Linear`` and ``nn.Conv2d``).
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
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    include = [include] if isinstance(include, str) else include
    unfit: dict[str, list[str]] = {g: [] for g in include or ()}  # per glob: why its matched layers do not fit
    plan = []
    for name, layer in _convertible_layers(model):
        globs = None if include is None else _matching(name, include)
        if globs == []:
            continue
        reason = _unfit_reason(layer, fmt, blocksize)
        for g in globs or ():
            if reason is None:
                unfit.pop(g, None)
            elif g in unfit:
                unfit[g].append(f"{name!r}: {reason}")
        if reason is None and _worth_converting(layer, bool(globs), min_sparsity):
            plan.append(name)
    if unfit:  # checked before any swap: on error the model is untouched
        glob, reasons = next(iter(unfit.items()))
        found = "; ".join(reasons) if reasons else "no nn.Linear or nn.Conv2d matched it"
        raise ValueError(f"include glob {glob!r} matched no layer that fits pattern {pattern!r}: {found}")
    for name in plan:
        sparse = _sparse_module(model.get_submodule(name), fmt, blocksize)
        if not name:
            return sparse
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, sparse)
    return model
