"""Checks that a model with its Linear layers swapped for sparse ones computes what the dense-with-zeros model does.

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


def check_example_input(example_input: Any) -> tuple[Tensor, ...]:
    """The model's positional inputs from a Tensor or a tuple/list of Tensors.

    Raises:
        TypeError: for anything else.
    """
    args = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(f"example_input must be a Tensor or a tuple of Tensors, got {type(example_input).__name__}")
    return args


def _capture(model: nn.Module, names: list[str], args: tuple) -> tuple[Any, dict[str, tuple[Tensor, Tensor]]]:
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen.setdefault(name, (inputs[0], output))  # first call of a shared layer

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        return model(*args), seen
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def verify_outputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    example_input: Tensor | tuple[Tensor, ...],
    rtol: float | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    """Runs ``model`` on ``example_input`` as it is and with ``layers`` swapped in; the outputs must match.

    Both passes run in eval mode (the modules' own modes are restored afterwards). Each swapped layer is also
    checked alone on the input its dense original saw, which names the worst layer.

    Args:
        model: the dense-with-zeros model (left unchanged).
        layers: module FQN -> replacement module (e.g. :class:`~lightning_sparse.nn.SparseLinear`).
        example_input: a real batch: a Tensor, or a tuple of the model's positional inputs.
        rtol: relative tolerance (default: per output dtype, :data:`DEFAULT_TOLERANCES`).
        atol: absolute tolerance (default: per output dtype).

    Returns:
        ``{"max_abs_error", "rtol", "atol", "worst_layer", "worst_layer_error", "input_shape"}``.

    Raises:
        TypeError: if ``example_input`` is not a Tensor or a tuple of Tensors.
        ValueError: if any output differs beyond tolerance (naming the max error and the worst layer).
    """
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    args = tuple(a.to(device) for a in check_example_input(example_input))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        dense, seen = _capture(model, [name for name in layers if name], args)
        with swapped(model, layers) as root:
            sparse = root(*args)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    expected, actual = output_tensors(dense), output_tensors(sparse)
    rtol, atol = tolerances(expected[0].dtype if expected else torch.float32, rtol, atol)
    checks = [_excess(a, e, rtol, atol) for a, e in zip(actual, expected, strict=True)]
    per_layer = {name: _excess(layers[name](x), y, rtol, atol)[0] for name, (x, y) in seen.items()}
    worst = max(per_layer, key=per_layer.get, default=None)
    report = {
        "max_abs_error": max((c[0] for c in checks), default=0.0),
        "rtol": rtol,
        "atol": atol,
        "worst_layer": worst,
        "worst_layer_error": per_layer.get(worst),
        "input_shape": [list(a.shape) for a in args],
    }
    if any(c[1] > 0 for c in checks):
        layer = f"; worst layer {worst!r} (max abs error {per_layer[worst]:.3g} on its own input)" if worst else ""
        raise ValueError(
            f"the sparse model's outputs differ from the dense-with-zeros model's on example_input: max abs error "
            f"{report['max_abs_error']:.3g} exceeds atol={atol} + rtol={rtol} * |dense|{layer}"
        )
    return report
