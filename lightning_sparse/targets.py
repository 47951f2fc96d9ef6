"""Which parameters are sparse: fully qualified names selected by glob patterns.

The default targets are the weights of every registered layer kind (:mod:`lightning_sparse.layers`: ``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention`` projections, Hugging Face ``Conv1D``, your own classes) inside the
model, except two kinds of weights no peer prunes by default (see :func:`dense_by_default`):

* the output embedding, the module a Hugging Face model's ``get_output_embeddings()`` returns (``lm_head``);
* any weight shared with an ``nn.Embedding`` (a tied head).

Biases, norms and embeddings are dense unless an ``include`` glob names them. A parameter shared by several modules
is one target, named as ``named_parameters()`` names it; an ``include`` glob may use any of its names.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> select_targets(model)
    ['0.weight', '2.weight']
    >>> select_targets(model, skip_last=True)
    ['0.weight']
    >>> select_targets(model, include="*.bias")
    ['0.bias', '2.bias']
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fnmatch import fnmatchcase

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_sparse.layers import layer_weights, parameter_aliases


def as_globs(argument: str, globs: str | Sequence[str] | None) -> list[str] | None:
    """``include`` / ``exclude`` as a list: a glob string or a list of them (``None`` stays ``None``).

    Raises:
        TypeError: for anything else, naming ``argument`` and showing the value.
    """
    if globs is None:
        return None
    if isinstance(globs, str):
        return [globs]
    if isinstance(globs, Sequence) and all(isinstance(g, str) for g in globs):
        return list(globs)
    raise TypeError(f"{argument} must be a glob string or a list of glob strings, got {globs!r}")


def _output_embeddings(model: nn.Module) -> set[int]:
    found = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            head = getter()
            if isinstance(getattr(head, "weight", None), nn.Parameter):
                found.add(id(head.weight))
    return found


def dense_by_default(model: nn.Module) -> dict[str, str]:
    """Layer weights :func:`default_targets` leaves dense, with the reason: ``{fqn: why}``."""
    heads = _output_embeddings(model)
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    params = dict(model.named_parameters())
    aliases = parameter_aliases(model)
    reasons = {}
    for name in layer_weights(model):
        why = []
        if id(params[name]) in heads:
            why.append("output embedding (get_output_embeddings())")
        if id(params[name]) in embeddings:
            tied = " = ".join(aliases[name])
            why.append(f"shared with the nn.Embedding {embeddings[id(params[name])]!r} ({tied})")
        if why:
            reasons[name] = "; ".join(why)
    return reasons


def default_targets(model: nn.Module) -> list[str]:
    """Weights of every registered layer kind, in parameter order, less :func:`dense_by_default`."""
    dense = dense_by_default(model)
    return [name for name in layer_weights(model) if name not in dense]


def _check_globs(argument: str, globs: Sequence[str], names: Sequence[str]) -> None:
    for glob in globs:
        if not any(fnmatchcase(name, glob) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{argument} glob {glob!r} matches no parameter of the model; parameters are: {shown}")


def _matched(aliases: dict[str, list[str]], globs: Sequence[str]) -> set[str]:
    return {name for name, names in aliases.items() if any(fnmatchcase(n, g) for n in names for g in globs)}


def select_targets(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_first: bool = False,
    skip_last: bool = False,
) -> list[str]:
    """Names of the parameters to sparsify, in the model's parameter order.

    Args:
        model: the module whose ``named_parameters()`` are searched.
        include: glob pattern(s) (``fnmatch``) of parameter names; ``None`` means :func:`default_targets`.
            Naming a weight :func:`dense_by_default` keeps dense warns when it is tied to an embedding.
        exclude: glob pattern(s) removed from the selection.
        skip_first: leave the first selected parameter dense.
        skip_last: leave the last selected parameter dense.

    Raises:
        ValueError: when a glob matches no parameter, or nothing is left to sparsify.
        TypeError: when ``include``/``exclude`` is neither a string nor a list of strings.
    """
    include, exclude = as_globs("include", include), as_globs("exclude", exclude)
    aliases = parameter_aliases(model)
    every_name = [n for names in aliases.values() for n in names]
    if include is None:
        selected = default_targets(model)
    else:
        _check_globs("include", include, every_name)
        chosen = _matched(aliases, include)
        selected = [name for name in aliases if name in chosen]
        _warn_tied(model, selected, aliases)
    if exclude:
        _check_globs("exclude", exclude, every_name)
        dropped = _matched(aliases, exclude)
        selected = [name for name in selected if name not in dropped]
    selected = selected[1 if skip_first else 0 : len(selected) - (1 if skip_last else 0)]
    if not selected:
        raise ValueError(
            f"no parameter left to sparsify (include={include}, exclude={exclude}, skip_first={skip_first}, "
            f"skip_last={skip_last}); the model's parameters are: {', '.join(every_name[:8])}"
        )
    return selected


def _warn_tied(model: nn.Module, selected: Sequence[str], aliases: dict[str, list[str]]) -> None:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = dict(model.named_parameters())
    for name in selected:
        if len(aliases[name]) > 1 and id(params[name]) in embeddings:
            rank_zero_warn(f"include selects {name}, which is tied ({' = '.join(aliases[name])}): pruning it prunes "
                           "the token embedding too")


def describe_targets(model: nn.Module, targets: Sequence[str]) -> str:
    """One line for the logs: how many targets of each layer kind, and which layer weights stay dense, and why."""
    kinds = layer_weights(model)
    counts = Counter(kinds[name].kind.name if name in kinds else "other parameter" for name in targets)
    text = "sparsifying " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
    dense = {name: why for name, why in dense_by_default(model).items() if name not in targets}
    if dense:
        text += "; left dense: " + "; ".join(f"{name} ({why})" for name, why in dense.items())
    return text
