"""Layer kinds: the one place that knows how a module stores its weight.

Every algorithm works on a weight's ``(out_features, in_features)`` matrix view: patterns (blocks, N:M along the
input dimension), ER/ERK fan-in/fan-out, SparseGPT's Hessian of the layer input, export. A *layer kind* says, for a
module class, which parameters are its prunable weights, how they look as that matrix, and how a matrix is written
back in the module's own layout:

* ``nn.Linear``: ``(out, in)`` as stored;
* ``nn.Conv1d/2d/3d``: ``(out, in * k...)`` (the stored tensor reshaped);
* ``nn.MultiheadAttention``: ``in_proj_weight`` / ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``
  (``out_proj`` is a Linear);
* Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): stored ``(in, out)``, so the matrix view is its
  transpose. It is recognised by class name and module, so transformers is never imported here.

:func:`register_layer` adds a user's own class; the newest registration wins.

Example::

    >>> import torch
    >>> from torch import nn
    >>> kind = layer_kind(nn.Conv2d(3, 8, 3))
    >>> kind.name, kind.matrix_shape((8, 3, 3, 3))
    ('Conv2d', (8, 27))
    >>> class Transposed(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.zeros(4, 2))  # (in, out)
    ...     def forward(self, x):
    ...         return x @ self.w
    >>> register_layer(Transposed, weight="w", transposed=True)
    >>> layer_kind(Transposed()).matrix_shape((4, 2))
    (2, 4)
    >>> unregister_layer(Transposed)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_sparse.core.patterns import NM, Blocks, Pattern, as_matrix_shape

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class LayerKind:
    """How one module class stores its prunable weights.

    Args:
        name: shown in logs and messages (the class name for built-in kinds).
        weights: attribute names of the prunable parameters.
        transposed: the weight is stored ``(in, out)`` (HF ``Conv1D``); its matrix view is the transpose.
    """

    name: str
    weights: tuple[str, ...] = ("weight",)
    transposed: bool = False

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)`` of a weight of this kind stored with ``shape``."""
        rows, cols = as_matrix_shape(tuple(shape))
        return (cols, rows) if self.transposed else (rows, cols)

    def as_matrix(self, weight: Tensor) -> Tensor:
        """The ``(out, in)`` view of ``weight`` (a view, not a copy, where the layout allows)."""
        return weight.t() if self.transposed else weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        """``matrix`` (``(out, in)``) in the layer's own layout ``shape``."""
        return matrix.t().reshape(tuple(shape)) if self.transposed else matrix.reshape(tuple(shape))


LINEAR = LayerKind("Linear")
HF_CONV1D = LayerKind("Conv1D", transposed=True)
_Matcher = Callable[[nn.Module], bool]


def _is_hf_conv1d(module: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def _builtin() -> list[tuple[_Matcher, LayerKind]]:
    kinds: list[tuple[_Matcher, LayerKind]] = [(lambda m: isinstance(m, nn.Linear), LINEAR), (_is_hf_conv1d, HF_CONV1D)]
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        kinds.append((lambda m, c=conv: isinstance(m, c), LayerKind(conv.__name__)))
    kinds.append((lambda m: isinstance(m, nn.MultiheadAttention), LayerKind("MultiheadAttention", _MHA_WEIGHTS)))
    return kinds


_BUILTIN = _builtin()
_REGISTERED: dict[type, LayerKind] = {}


def register_layer(cls: type, weight: str | Sequence[str] = "weight", transposed: bool = False) -> None:
    """Teach every algorithm a module class of your own.

    Args:
        cls: the ``nn.Module`` subclass (its subclasses match too).
        weight: the attribute name(s) of its prunable parameter(s).
        transposed: the weight is stored ``(in, out)`` and used as ``x @ weight``.

    Raises:
        TypeError: when ``cls`` is not an ``nn.Module`` subclass, or ``weight`` is not a name or list of names.
        ValueError: at setup, when a module of ``cls`` has no parameter named ``weight`` (see :func:`layer_kind`).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer(cls=...) needs an nn.Module subclass, got {cls!r}")
    names = (weight,) if isinstance(weight, str) else tuple(weight)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"register_layer(weight=...) needs a parameter name or a list of names, got {weight!r}")
    if transposed and len(names) != 1:
        raise ValueError(f"register_layer(transposed=True) takes one weight name, got weight={weight!r}")
    _REGISTERED[cls] = LayerKind(cls.__name__, names, bool(transposed))


def unregister_layer(cls: type) -> None:
    """Forget a class given to :func:`register_layer` (no error when it was not registered)."""
    _REGISTERED.pop(cls, None)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, or ``None`` when no registered kind matches.

    Raises:
        ValueError: when a class given to :func:`register_layer` lacks the parameter it was registered with.
    """
    for cls in type(module).__mro__:
        kind = _REGISTERED.get(cls)
        if kind is not None:
            missing = [n for n in kind.weights if not isinstance(getattr(module, n, None), nn.Parameter)]
            if missing:
                raise ValueError(
                    f"register_layer({cls.__name__}, weight={kind.weights!r}): {type(module).__name__} has no "
                    f"parameter {missing[0]!r}; its parameters are {[n for n, _ in module.named_parameters()]}"
                )
            return kind
    return next((kind for matches, kind in _BUILTIN if matches(module)), None)


@dataclass(frozen=True)
class LayerWeight:
    """One prunable weight of a model: where it lives and its kind."""

    module: str
    attr: str
    kind: LayerKind

    @property
    def fqn(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr


def layer_weights(model: nn.Module) -> dict[str, LayerWeight]:
    """``parameter FQN -> LayerWeight`` for every prunable weight, keyed like ``model.named_parameters()``.

    A parameter shared by several modules (tied weights) appears once, under the name ``named_parameters()``
    gives it, with the kind of the first module that owns it.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    found: dict[str, LayerWeight] = {}
    for module_name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        for attr in kind.weights:
            param = module._parameters.get(attr)
            name = canonical.get(id(param)) if param is not None else None
            if name is not None and name not in found:
                found[name] = LayerWeight(module_name, attr, kind)
    order = list(canonical.values())
    return {name: found[name] for name in order if name in found}


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``canonical FQN -> every FQN`` of each parameter (more than one for tied weights)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {name: [] for name in canonical.values()}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[canonical[id(p)]].append(name)
    return aliases


def matrix_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each named weight (its layer kind's view; the plain ``(rows, -1)`` view otherwise)."""
    kinds = layer_weights(model)
    params = dict(model.named_parameters())
    shapes = {name: tuple(params[name].shape) for name in names}
    return {name: kinds[name].kind.matrix_shape(shape) if name in kinds else as_matrix_shape(shape)
            for name, shape in shapes.items()}


def check_pattern(
    pattern: Pattern, name: str, kind: LayerKind | None, shape: Sequence[int], argument: str | None = None
) -> None:
    """Check that ``pattern`` fits weight ``name`` along its ``(out, in)`` view.

    ``argument``: how the user wrote the pattern (``"tile_size=7"``); default ``pattern='...'``.

    Raises:
        ValueError: naming the layer, its kind, its stored shape and its ``(out, in)`` view.
    """
    (rows, cols), shape = (kind.matrix_shape(shape) if kind else as_matrix_shape(tuple(shape))), tuple(shape)
    where = f"{name}: a {kind.name if kind else 'parameter'} weight stored as {shape}, (out, in) view {rows}x{cols}"
    argument = argument or f"pattern={str(pattern)!r}"
    if isinstance(pattern, Blocks) and (rows % pattern.rows or cols % pattern.cols):
        example = _as_argument(argument, pattern.fitting(rows, cols))
        raise ValueError(f"{argument} ({pattern} blocks of the (out, in) view) does not tile {where}; choose a block "
                         f"whose sides divide {rows} and {cols}{example}, or exclude {name!r}")
    if isinstance(pattern, NM) and cols % pattern.m:
        example = _as_argument(argument, pattern.fitting(cols))
        raise ValueError(f"{argument} needs the input dimension to be divisible by m={pattern.m}, but {where} "
                         f"has {cols} inputs; exclude {name!r} or choose another pattern{example}")


def _as_argument(argument: str, pattern: Pattern | None) -> str:
    """`` (e.g. tile_size=4)``: a pattern that fits, written as the user wrote ``argument`` (``tile_size=7``,
    ``pattern='7x7'``, ``n=2, m=4``, ``nm='2:4'``); empty when none fits."""
    if pattern is None:
        return ""
    key = argument.partition("=")[0].strip()
    if isinstance(pattern, NM):
        value = f"n={pattern.n}, m={pattern.m}" if key == "n" else f"{key}={str(pattern)!r}"
        return f" (e.g. {value}, the same density)"
    square = isinstance(pattern, Blocks) and pattern.rows == pattern.cols and key == "tile_size"
    return f" (e.g. {key}={pattern.rows if square else repr(str(pattern))})"


def kind_of(model: nn.Module, names: Sequence[str]) -> dict[str, LayerKind | None]:
    """The layer kind of each named parameter (``None`` for a parameter no kind owns, e.g. a bias)."""
    kinds = layer_weights(model)
    return {name: kinds[name].kind if name in kinds else None for name in names}
