"""Checks that a model with layers swapped in (sparse layers, a reloaded Hugging Face model) computes what the
dense-with-zeros model does.

Example::

    >>> from torch import nn
    >>> from lightning_sparse.nn import SparseLinear
    >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    >>> _ = model[0].weight.data[:16].zero_()
    >>> report = verify_outputs(model, {"0": SparseLinear.from_dense(model[0], blocksize=16)}, torch.randn(4, 32))
    >>> report["worst_layer"], report["max_abs_error"] < 1e-5
    ('0', True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
"""``(rtol, atol)`` per output dtype: sparse kernels sum in another order than dense ``F.linear``."""


def tolerances(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """``(rtol, atol)`` for outputs of ``dtype``: the given ones, else :data:`DEFAULT_TOLERANCES` (fp32's otherwise).

    Raises:
        ValueError: if ``rtol`` or ``atol`` is negative.
    """
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    for argument, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise ValueError(f"{argument} must be >= 0, got {value}")
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def output_tensors(output: Any) -> list[Tensor]:
    """The tensors in a model output (a Tensor, or nested tuples, lists and dicts of them), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, tuple | list):
        return [t for value in output for t in output_tensors(value)]
    return []


def _excess(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> tuple[float, float]:
    """(max abs error, max of ``|a - e| - atol - rtol |e|``: positive when out of tolerance)."""
    error = (actual.double() - expected.double()).abs()
    if error.numel() == 0:
        return 0.0, float("-inf")
    return error.max().item(), (error - atol - rtol * expected.double().abs()).max().item()


@contextmanager
def swapped(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily puts ``layers`` (module FQN -> module) into ``model``; yields the root to call."""
    originals = {name: model.get_submodule(name) for name in layers if name}
    try:
        for name, layer in layers.items():
            if name:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        yield layers.get("", model)
    finally:
        for name, layer in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


ModelInput = Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]
"""A real batch: a Tensor, a tuple of positional inputs, or a dict of keyword inputs (``model(**batch)``: a Hugging
Face batch ``{"input_ids", "attention_mask", ...}``)."""


def check_example_input(example_input: Any) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """The model's positional and keyword inputs from a Tensor, a tuple/list of Tensors or a dict of Tensors.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(example_input, Mapping):
        kwargs = dict(example_input)
        if kwargs and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in kwargs.items()):
            return (), kwargs
    else:
        args = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
        if args and all(isinstance(a, Tensor) for a in args):
            return args, {}
    raise TypeError(
        "example_input must be a Tensor, a tuple of Tensors or a dict of Tensors (keyword inputs), got "
        f"{type(example_input).__name__}"
    )


def move_input(example_input: ModelInput, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInput:
    """``example_input`` on ``device``, its floating-point tensors cast to ``dtype`` (when given); same structure."""

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    args, kwargs = check_example_input(example_input)
    if kwargs:
        return {k: move(v) for k, v in kwargs.items()}
    return move(args[0]) if isinstance(example_input, Tensor) else tuple(move(a) for a in args)


def run_model(model: nn.Module, example_input: ModelInput) -> Any:
    """``model(*args)`` or ``model(**kwargs)`` on ``example_input``."""
    args, kwargs = check_example_input(example_input)
    return model(*args, **kwargs)


def batch_size(example_input: ModelInput) -> int:
    """Rows of the first input tensor (``1`` for a 0-d tensor)."""
    args, kwargs = check_example_input(example_input)
    first = args[0] if args else next(iter(kwargs.values()))
    return first.shape[0] if first.dim() else 1


def input_shapes(example_input: ModelInput) -> list[list[int]] | dict[str, list[int]]:
    """The shapes of a model input: a list for positional inputs, a dict for keyword inputs."""
    args, kwargs = check_example_input(example_input)
    return {k: list(v.shape) for k, v in kwargs.items()} if kwargs else [list(a.shape) for a in args]


def _capture(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> tuple[Any, dict[str, tuple]]:
    seen: dict[str, tuple] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple, kw: dict, output: Any) -> None:
            seen.setdefault(name, (inputs, kw, output))  # first call of a shared layer

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name), with_kwargs=True) for name in names]
    try:
        return model(*args, **kwargs), seen
    finally:
        for hook in hooks:
            hook.remove()


def _compare(actual: Any, expected: Any, rtol: float, atol: float) -> list[tuple[float, float]]:
    """:func:`_excess` of every output tensor pair.

    Raises:
        ValueError: if the outputs hold different numbers of tensors.
    """
    actual, expected = output_tensors(actual), output_tensors(expected)
    if len(actual) != len(expected):
        raise ValueError(f"the swapped-in model returns {len(actual)} tensors, the dense model {len(expected)}")
    return [_excess(a, e, rtol, atol) for a, e in zip(actual, expected, strict=True)]


@torch.no_grad()
def verify_outputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    example_input: ModelInput,
    rtol: float | None = None,
    atol: float | None = None,
    *,
    subject: str = "the sparse model",
) -> dict[str, Any]:
    """Runs ``model`` on ``example_input`` as it is and with ``layers`` swapped in; the outputs must match.

    Both passes run in eval mode (the modules' own modes are restored afterwards). Each swapped layer is also
    checked alone on the input its dense original saw, which names the worst layer.

    Args:
        model: the dense-with-zeros model (left unchanged).
        layers: module FQN -> replacement module (e.g. :class:`~lightning_sparse.nn.SparseLinear`).
        example_input: a real batch: a Tensor, a tuple of the model's positional inputs, or a dict of its keyword
            inputs (``model(**example_input)``, e.g. a Hugging Face batch).
        rtol: relative tolerance (default: per output dtype, :data:`DEFAULT_TOLERANCES`).
        atol: absolute tolerance (default: per output dtype).
        subject: what the swapped-in model is called in the error message.

    Returns:
        ``{"max_abs_error", "rtol", "atol", "worst_layer", "worst_layer_error", "input_shape"}`` (``input_shape``: a
        list of shapes of positional inputs, a dict of shapes of keyword inputs).

    Raises:
        TypeError: if ``example_input`` is not a Tensor, a tuple of Tensors or a dict of Tensors.
        ValueError: if any output differs beyond tolerance (naming the max error and the worst layer).
    """
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    args, kwargs = check_example_input(example_input)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        dense, seen = _capture(model, [name for name in layers if name], args, kwargs)
        with swapped(model, layers) as root:
            sparse = root(*args, **kwargs)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    expected = output_tensors(dense)
    rtol, atol = tolerances(expected[0].dtype if expected else torch.float32, rtol, atol)
    checks = _compare(sparse, dense, rtol, atol)
    per_layer = {
        name: max((c[0] for c in _compare(layers[name](*a, **kw), y, rtol, atol)), default=0.0)
        for name, (a, kw, y) in seen.items()
    }
    worst = max(per_layer, key=per_layer.get, default=None)
    report = {
        "max_abs_error": max((c[0] for c in checks), default=0.0),
        "rtol": rtol,
        "atol": atol,
        "worst_layer": worst,
        "worst_layer_error": per_layer.get(worst),
        "input_shape": input_shapes(example_input),
    }
    if any(c[1] > 0 for c in checks):
        layer = f"; worst layer {worst!r} (max abs error {per_layer[worst]:.3g} on its own input)" if worst else ""
        raise ValueError(
            f"{subject}'s outputs differ from the dense-with-zeros model's on example_input: max abs error "
            f"{report['max_abs_error']:.3g} exceeds atol={atol} + rtol={rtol} * |dense|{layer}"
        )
    return report
