"""Which layers an export converts, and why each other layer stays dense (pure: reads weights, changes nothing).

Linear layers (``nn.Linear`` and Hugging Face ``Conv1D``, read on their ``(out, in)`` view, see
:mod:`lightning_sparse.nn.eligible`) and ``nn.Conv2d`` layers are converted. With ``include=None`` every linear layer
that fits the pattern and holds zeros is converted, and every Conv2d that fits a block pattern and reads few enough
of its input channels to run faster (:func:`~lightning_sparse.nn.sparse_conv.slow_conv_reason`); any other layer is
left dense with a reason. A layer named by ``include`` must fit (a named Conv2d converts whatever channels it reads).
A linear layer pruned in a way that breaks the pattern it is exported to (zeros, but not 2:4 along its inputs) is an
error in both cases. A layer whose weight is tied to another module (GPT-2's ``lm_head`` and ``wte``) stays dense,
and naming it in ``include`` is an error.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> _ = model[0].weight.data[:, 32:].zero_()
    >>> [(p.name, p.convert, p.reason) for p in plan_layers(model, "32x32")]
    [('0', True, None), ('2', False, 'shape (10, 64) is not divisible by the block 32x32')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from lightning_sparse.core.patterns import as_matrix_shape
from lightning_sparse.formats.bsr import parse_blocksize
from lightning_sparse.formats.semi_structured import dense_to_sparse24
from lightning_sparse.layers import LayerKind, layer_kind
from lightning_sparse.nn.convert import MHA_OUT_PROJ_REASON
from lightning_sparse.nn.eligible import describe_view, linear_kind, linear_unfit_reason, tied_reason, tied_weights
from lightning_sparse.nn.sparse_conv import conv_unfit_reason, slow_conv_reason
from lightning_sparse.targets import as_globs

PATTERNS_HELP = '"RxC" blocks (e.g. "32x32"), "2:4" or "dense"'
CONVERTED_KINDS = "nn.Linear, Hugging Face Conv1D and nn.Conv2d"


@dataclass
class LayerPlan:
    """One layer's fate: ``convert`` it, or keep it dense for ``reason``; ``error`` stops the export.

    ``kind`` is the layer's kind in :mod:`lightning_sparse.layers` (``None`` for a module no kind describes).
    """

    name: str
    module: nn.Module
    convert: bool = False
    reason: str | None = None
    error: str | None = None
    stored_density: float | None = None
    kind: LayerKind | None = None
    pattern: str | None = None  # the export pattern of this layer (the export's, or its own)

    def matrix(self) -> torch.Tensor:
        """The detached ``(out, in)`` view of the weight (a Conv2d's ``(out, in * kh * kw)``)."""
        weight = self.module._parameters["weight"].detach()
        return self.kind.as_matrix(weight) if self.kind else weight.reshape(weight.shape[0], -1)

    def entry(self) -> dict[str, Any]:
        """The layer's record in the manifest (``shape``: as stored; ``matrix_shape``: its ``(out, in)`` view)."""
        weight = self.module._parameters["weight"].detach()
        view = self.kind.matrix_shape(weight.shape) if self.kind else as_matrix_shape(tuple(weight.shape))
        return {
            "param": f"{self.name}.weight" if self.name else "weight",
            "type": type(self.module).__name__,
            "shape": list(weight.shape),
            "matrix_shape": list(view),
            "density": torch.count_nonzero(weight).item() / max(weight.numel(), 1),
            "converted": self.convert,
            "stored_density": self.stored_density if self.convert else None,
            "reason": self.reason,
            **({"pattern": self.pattern} if self.convert else {}),
        }


def parse_export_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    """``"dense"`` -> ``("dense", None)``, ``"2:4"`` -> ``("2:4", None)``, ``"RxC"`` -> ``("bsr", (R, C))``.

    Raises:
        ValueError: for any other pattern.
    """
    if pattern in ("dense", "2:4"):
        return pattern, None
    try:
        return "bsr", parse_blocksize(pattern)
    except ValueError:
        raise ValueError(f"pattern must be {PATTERNS_HELP}, got {pattern!r}") from None


def check_include(include: Sequence[str] | str | None) -> list[str] | None:
    """Normalizes ``include`` (one glob or a list of globs) to a list: :func:`lightning_sparse.targets.as_globs`.

    Raises:
        TypeError: if it is neither a string nor a sequence of strings.
    """
    return as_globs("include", include)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module._parameters.get("weight"), torch.Tensor) and module._parameters["weight"].dim() >= 2
    ]


def _block_fraction(matrix: torch.Tensor, blocksize: tuple[int, int]) -> float:
    (n, k), (r, c) = matrix.shape, blocksize
    return (matrix.reshape(n // r, r, k // c, c) != 0).any(dim=3).any(dim=1).float().mean().item()


def _plan_conv(plan: LayerPlan, fmt: str, blocksize: tuple[int, int] | None, explicit: bool) -> None:
    problem = conv_unfit_reason(plan.module, fmt, blocksize)
    if problem is not None:
        plan.error, plan.reason = (problem, None) if explicit else (None, problem)
        return
    plan.reason = None if explicit else slow_conv_reason(plan.module.weight.detach())
    plan.stored_density = _block_fraction(plan.matrix(), blocksize)
    plan.convert = plan.reason is None


def _plan_linear(plan: LayerPlan, fmt: str, blocksize: tuple[int, int] | None, explicit: bool) -> None:
    matrix = plan.matrix()
    problem = linear_unfit_reason(plan.module, fmt, blocksize)
    if problem is None and fmt == "2:4" and ((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(-1) > 2).any():
        if not explicit and not (matrix == 0).any():
            plan.reason = "the weight has no zeros"
            return
        try:
            dense_to_sparse24(matrix)
        except ValueError as err:  # the format names the first offending group (of the (out, in) view)
            where = describe_view(plan.kind, plan.module.weight.shape)
            plan.error = str(err) if where.startswith("shape") else f"{where}: {err}"
            return
    if problem is not None:
        plan.error, plan.reason = (problem, None) if explicit else (None, problem)
        return
    plan.stored_density = 0.5 if fmt == "2:4" else _block_fraction(matrix, blocksize)
    if not explicit and plan.stored_density == 1.0:
        plan.reason = f"every {blocksize[0]}x{blocksize[1]} block holds a non-zero: BSR would store the whole weight"
        return
    plan.convert = True


def check_layer_patterns(pattern: str, layer_patterns: Mapping[str, str] | None) -> dict[str, str]:
    """Checks per-layer patterns (parameter FQN -> pattern): each parses, in the export's format (blocks beside blocks).

    Raises:
        ValueError: naming the layer, its pattern and the export's.
        TypeError: if ``layer_patterns`` is not a mapping.
    """
    if layer_patterns is None:
        return {}
    if not isinstance(layer_patterns, Mapping):
        raise TypeError(f"layer_patterns must be a mapping of parameter name -> pattern, got "
                        f"{type(layer_patterns).__name__}")
    fmt = parse_export_pattern(pattern)[0]
    for name, own in layer_patterns.items():
        if parse_export_pattern(own)[0] != fmt or fmt == "dense":
            raise ValueError(f"layer_patterns[{name!r}] is {own!r}, which the {pattern!r} export cannot store: a "
                             "layer's own pattern must be of the export's format (blocks in a blocks export)")
    return dict(layer_patterns)


def plan_layers(model: nn.Module, pattern: str, include: Sequence[str] | str | None = None,
                layer_patterns: Mapping[str, str] | None = None) -> list[LayerPlan]:
    """Plans the conversion of every layer with a 2-D (or larger) ``weight`` parameter, in module order.

    Args:
        model: the dense-with-zeros model.
        pattern: ``"RxC"`` blocks, ``"2:4"`` or ``"dense"`` (nothing converted); read on each layer's ``(out, in)``
            view (2:4 along the input dimension: dim 0 of a Hugging Face ``Conv1D`` weight).
        include: FQN globs of the layers to convert, matched against the module name or ``<name>.weight``;
            ``None``: every layer that fits and is worth converting (see the module docstring).
        layer_patterns: parameter FQN -> the pattern that layer is stored in instead of ``pattern`` (the same
            format: blocks of another size), e.g. the blocks it was trained in.

    Returns:
        One :class:`LayerPlan` per layer; plans with an ``error`` must stop an export.

    Raises:
        ValueError: on a bad ``pattern``, or an ``include`` glob that matches no ``nn.Linear``, Hugging Face
            ``Conv1D`` or ``nn.Conv2d``.
        TypeError: if ``include`` is not a glob or a list of globs.
    """
    default = pattern
    parse_export_pattern(pattern)
    own = check_layer_patterns(pattern, layer_patterns)
    include = check_include(include)
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    out_projs = {f"{n}.out_proj" if n else "out_proj" for n in mha}
    tied = tied_weights(model)
    plans, used = [], set()
    for name, module in _weight_layers(model):
        plan = LayerPlan(name, module, kind=layer_kind(module))
        plan.pattern = own.get(f"{name}.weight" if name else "weight", default)
        fmt, blocksize = parse_export_pattern(plan.pattern)
        plans.append(plan)
        globs = [g for g in include or () if fnmatchcase(name, g) or fnmatchcase(f"{name}.weight", g)]
        linear = linear_kind(module) is not None
        if not (linear or isinstance(module, nn.Conv2d)):
            plan.reason = f"{type(module).__name__} layers are not converted (only {CONVERTED_KINDS})"
            continue
        used.update(globs)
        if fmt == "dense":
            plan.reason = "pattern 'dense' converts no layer"
        elif name in out_projs or name in tied:
            plan.reason = MHA_OUT_PROJ_REASON if name in out_projs else tied_reason(tied[name])
            plan.error = plan.reason if globs else None
        elif include is not None and not globs:
            plan.reason = "not matched by include"
        elif linear:
            _plan_linear(plan, fmt, blocksize, explicit=bool(globs))
        else:
            _plan_conv(plan, fmt, blocksize, explicit=bool(globs))
    unused = [g for g in include or () if g not in used]
    if unused:
        kinds = CONVERTED_KINDS.replace(" and ", " or ")
        raise ValueError(f"include glob {unused[0]!r} matches no {kinds} of the model")
    return plans
