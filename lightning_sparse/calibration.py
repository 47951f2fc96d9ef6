"""Calibration passes for one-shot pruning: how a batch reaches the model, and block-by-block calibration.

:func:`default_forward` passes a batch the way a LightningModule's step does: ``model(**batch)`` for a mapping (what
Hugging Face datamodules yield), ``model(batch[0])`` for a tuple or list, ``model(batch)`` for a tensor.

:func:`find_blocks` finds the model's stack of repeated blocks (an ``nn.ModuleList`` of one class holding every
target: GPT-2's ``transformer.h``, Llama's ``model.layers``). :class:`BlockInputs` runs the model once per batch up to
the first block, keeps each batch's block inputs, and then runs one block at a time on them, passing each block's
output to the next (what the SparseGPT paper does), so pruning a 32-block model costs about one forward of the model
per calibration batch instead of one per target layer (:mod:`lightning_sparse.replay` runs the passes of one block).

Example::

    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Linear(3, 4)
    ...         self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))
    ...     def forward(self, x):
    ...         x = self.embed(x)
    ...         for block in self.blocks:
    ...             x = block(x)
    ...         return x
    >>> net = Net()
    >>> find_blocks(net, ["blocks.0.0.weight", "blocks.1.0.weight"])
    'blocks'
    >>> inputs = BlockInputs(net, "blocks", [torch.randn(2, 3)], default_forward)
    >>> out = inputs.run_block(0)[0]
    >>> inputs.advance(0)
    >>> torch.equal(inputs.run_block(1)[0], net.blocks[1](out))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.distributed import reshard_after_abort

Forward = Callable[[nn.Module, Any], None]
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def default_forward(model: nn.Module, batch: Any) -> None:
    """Run one calibration batch, tensors moved to the model's device.

    ``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple or list, ``model(batch)`` for a tensor.

    Raises:
        TypeError: for any other batch, saying what it got and how to pass ``forward=``.
    """
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        model(**{key: _to(value, device) for key, value in batch.items()})
    elif isinstance(batch, tuple | list) and batch:
        model(_to(batch[0], device))
    elif isinstance(batch, Tensor):
        model(batch.to(device))
    else:
        raise TypeError(
            f"cannot pass a calibration batch of type {type(batch).__name__} to the model (mappings are passed as "
            "model(**batch), tuples and lists as model(batch[0]), tensors as model(batch)); pass "
            "forward=lambda model, batch: model(...) to say how"
        )


def find_blocks(model: nn.Module, names: Sequence[str]) -> str | None:
    """The name of the ``nn.ModuleList`` of same-class blocks that holds every target in ``names``, or ``None``."""
    best = None
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        inside = f"{prefix}." if prefix else ""
        if all(name.startswith(inside) and name[len(inside):].split(".", 1)[0].isdigit() for name in names):
            best = prefix  # the innermost list that still holds every target
    return best


class BlocksNotCalled(ValueError):
    """The forward never called the first block as a module (e.g. it calls the layers inside it directly)."""


class _Reached(Exception):
    """Raised by the pre-hook of the first block: the rest of the model need not run."""


class BlockInputs:
    """Each calibration batch's inputs to the current block of ``model.<blocks>``.

    Args:
        model: the model.
        blocks: name of its block list (see :func:`find_blocks`).
        batches: calibration batches.
        forward: ``forward(model, batch)`` (see :func:`default_forward`).

    Raises:
        ValueError: when a batch never reaches the first block, the block's hidden state is not its first
            argument or ``hidden_states``, or a block is called with a key-value cache.
    """

    def __init__(self, model: nn.Module, blocks: str, batches: Sequence[Any], forward: Forward) -> None:
        self.blocks: nn.ModuleList = model.get_submodule(blocks)
        self.name = blocks
        self.calls = [self._first_call(model, batch, forward) for batch in batches]

    def _first_call(self, model: nn.Module, batch: Any, forward: Forward) -> tuple[tuple, dict]:
        seen: list[tuple[tuple, dict]] = []

        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((args, kwargs))
            raise _Reached

        handle = self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            forward(model, batch)
        except _Reached:
            reshard_after_abort(model)
        finally:
            handle.remove()
        if not seen:
            raise BlocksNotCalled(f"a calibration batch never reached {self.name}.0: the forward did not call it")
        args, kwargs = seen[0]
        if not args and "hidden_states" not in kwargs:
            raise ValueError(f"{self.name}.0 was called without a positional argument or hidden_states=...: "
                             "cannot tell which argument carries the hidden state")
        cached = [key for key in _CACHE_ARGUMENTS if kwargs.get(key) is not None]
        if cached or (len(args) > 1 and type(args[1]).__name__.endswith("Cache")):
            raise ValueError(f"{self.name}.0 was called with a key-value cache ({cached or 'positional'}); run the "
                             "calibration forward with use_cache=False")
        return args, kwargs

    def run_block(self, index: int) -> list[Tensor]:
        """Block ``index``'s output (its hidden state) for every batch."""
        outputs = []
        for args, kwargs in self.calls:
            out = self.blocks[index](*args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple | list) else out)
        return outputs

    def forward_block(self, index: int) -> Forward:
        """A ``forward(model, call)`` that runs block ``index`` on one cached call (for hook-based capture)."""

        def run(model: nn.Module, call: tuple[tuple, dict]) -> None:
            self.blocks[index](*call[0], **call[1])

        return run

    def advance(self, index: int, outputs: Sequence[Any] | None = None) -> None:
        """Replace the cached inputs by block ``index``'s outputs (the next block's inputs); ``outputs``: the block's
        outputs for every call when already computed (a tuple's first item is the hidden state)."""
        outputs = self.run_block(index) if outputs is None else [
            out[0] if isinstance(out, tuple | list) else out for out in outputs
        ]
        self.calls = [
            ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            for hidden, (args, kwargs) in zip(outputs, self.calls, strict=True)
        ]


def shared_input_groups(model: nn.Module, order: Sequence[str], owners: Mapping[str, str], run: Callable[[], None]):
    """Split ``order`` (targets in forward order) into runs of consecutive targets whose layers read the very same
    input tensor in one call of ``run`` (q/k/v, gate/up): pruning one of them cannot change the others' inputs.

    ``owners``: target -> name of the module to watch.
    """
    modules = dict(model.named_modules())
    first: dict[str, Tensor] = {}

    def watch(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            first.setdefault(name, x)

        return hook

    handles = [modules[owners[name]].register_forward_pre_hook(watch(name), with_kwargs=True) for name in order]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in order:
        if groups and name in first and first.get(groups[-1][0]) is first[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups
