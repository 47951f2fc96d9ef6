"""Which parameters are sparse: fully qualified names selected by glob patterns.

The default targets are the weights of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and the projection weights of
``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``; ``out_proj`` is a Linear).
Biases, norms and embeddings are dense unless an ``include`` glob names them.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> select_targets(model)
    ['0.weight', '2.weight']
    >>> select_targets(model, skip_last=True)
    ['0.weight']
    >>> select_targets(model, include=["*.bias"])
    ['0.bias', '2.bias']
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def default_targets(model: nn.Module) -> list[str]:
    """Weights of Linear, Conv1d/2d/3d and MultiheadAttention projections, in parameter order."""
    candidates = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _PRUNABLE):
            candidates.add(prefix + "weight")
        elif isinstance(module, nn.MultiheadAttention):
            candidates.update(prefix + name for name in _MHA_WEIGHTS if getattr(module, name, None) is not None)
    return [name for name, _ in model.named_parameters() if name in candidates]


def _matching(names: Sequence[str], glob: str) -> list[str]:
    return [name for name in names if fnmatchcase(name, glob)]


def _check_globs(argument: str, globs: Sequence[str], names: Sequence[str]) -> None:
    if isinstance(globs, str):
        raise TypeError(f"{argument} must be a list of glob strings, got the string {globs!r}; use [{globs!r}]")
    for glob in globs:
        if not _matching(names, glob):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{argument} glob {glob!r} matches no parameter of the model; parameters are: {shown}")


def select_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_first: bool = False,
    skip_last: bool = False,
) -> list[str]:
    """Names of the parameters to sparsify, in the model's parameter order.

    Args:
        model: the module whose ``named_parameters()`` are searched.
        include: glob patterns (``fnmatch``) of parameter names; ``None`` means :func:`default_targets`.
        exclude: glob patterns removed from the selection.
        skip_first: leave the first selected parameter dense.
        skip_last: leave the last selected parameter dense.

    Raises:
        ValueError: when a glob matches no parameter, or nothing is left to sparsify.
        TypeError: when ``include``/``exclude`` is a bare string.
    """
    all_names = [name for name, _ in model.named_parameters()]
    if include is None:
        selected = default_targets(model)
    else:
        _check_globs("include", include, all_names)
        selected = [name for name in all_names if any(fnmatchcase(name, glob) for glob in include)]
    if exclude:
        _check_globs("exclude", exclude, all_names)
        selected = [name for name in selected if not any(fnmatchcase(name, glob) for glob in exclude)]
    selected = selected[1 if skip_first else 0 : len(selected) - (1 if skip_last else 0)]
    if not selected:
        raise ValueError(
            f"no parameter left to sparsify (include={include}, exclude={exclude}, skip_first={skip_first}, "
            f"skip_last={skip_last}); the model's parameters are: {', '.join(all_names[:8])}"
        )
    return selected
