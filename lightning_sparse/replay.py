"""Replayed block passes: layer-by-layer calibration of one block at about the cost of one pass of it.

Exact sequential SparseGPT prunes the layers of a block group by group ({q, k, v}, {o}, {gate, up}, {down} on a Llama),
each group calibrated on a pass of the block over the groups pruned before it. Re-running the whole block for every
group repeats work whose result cannot have changed: a module whose call starts before the first call of the group
just pruned, and whose subtree does not hold that group, gets the very same inputs and weights as in the pass before,
so its output is the same tensor. :class:`GroupPasses` keeps those outputs (per calibration call) and returns them
instead of running the module again, and stops a pass as soon as the group's layers have read their inputs. The
results are bit-identical to re-running everything (the block's forward must be deterministic for a given input, as
the calibration itself assumes, and a target weight must be used only through its module's call, which is how its
inputs are captured).

A kept output that later code modified in place (its tensors' version counters moved) is not replayed: the module
runs. Only modules called once per block pass are replayed, and only outputs that are a tensor or a tuple or list of
tensors and ``None``; only outputs no wider than the block's input are kept, so the memory is at most a few times
that of the block's cached inputs.

Example::

    >>> import torch
    >>> from torch import nn
    >>> block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    >>> calls = [((torch.randn(3, 4),), {})]
    >>> passes = GroupPasses(block, calls, [["0"], ["2"]])
    >>> passes.run(0, 0)  # group ["0"]: stops once block[0] has read its input
    >>> with torch.no_grad():
    ...     _ = block[0].weight.mul_(0.5)  # "prune" group 0
    >>> passes.run(1, 0)  # group ["2"]: block[0] and ReLU run (block[0] changed), block[2] reads, stop
    >>> with torch.no_grad():
    ...     _ = block[2].weight.mul_(0.5)
    >>> out = passes.run(2, 0)  # the block's output: block[0] and the ReLU replayed, only block[2] runs
    >>> torch.equal(out, block(*calls[0][0]))
    True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.distributed import reshard_after_abort
from lightning_sparse.layers import HF_CONV1D, layer_kind


class _Stop(Exception):
    """Raised once the group's layers have read their inputs: the rest of the pass is not needed."""


def _tensors(output: Any) -> list[Tensor] | None:
    """The tensors of a replayable output (a tensor, or a tuple or list of tensors and ``None``), else ``None``."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, tuple | list) and all(item is None or isinstance(item, Tensor) for item in output):
        return [item for item in output if item is not None]
    return None


def _hidden(call: tuple[tuple, dict]) -> Tensor:
    """The hidden state of a cached block call: its first argument or ``hidden_states``."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def recording_calls(block: nn.Module, sequence: list[str]) -> Iterator[list[str]]:
    """Within the block, append the name of each submodule of ``block`` to ``sequence`` as a call enters it."""
    handles = [module.register_forward_pre_hook(lambda *_, name=name: sequence.append(name))
               for name, module in block.named_modules() if name]
    try:
        yield sequence
    finally:
        for handle in handles:
            handle.remove()


def _call_sequence(block: nn.Module, call: tuple[tuple, dict]) -> list[str]:
    """The names of ``block``'s submodules in the order one pass enters them (a name once per call)."""
    with recording_calls(block, []) as sequence, torch.no_grad():
        block(*call[0], **call[1])
    return sequence


def _output_features(module: nn.Module) -> int | None:
    """The output width of a plain ``nn.Linear`` or HF ``Conv1D`` (``x @ W`` with ``W`` stored ``(in, out)``)."""
    if type(module) is nn.Linear:
        return module.out_features
    if layer_kind(module) is HF_CONV1D:
        return module.weight.shape[1]
    return None


def _inside(name: str, owner: str) -> bool:
    return owner == name or owner.startswith(f"{name}.")


class GroupPasses:
    """Passes of ``block`` over cached ``calls`` for consecutive groups of layers, replaying what cannot have changed.

    Args:
        block: the block.
        calls: its cached ``(args, kwargs)`` calls, one per calibration batch.
        groups: for each group, in forward order, the names (relative to ``block``) of the modules whose inputs it
            reads; group ``g`` is pruned after :meth:`run` ``(g, i)`` for every call ``i``.
        stop_early: per group, whether a pass may stop once those modules were entered (default: every group); a
            group whose inputs are captured after its module returns (attention output projections) needs ``False``.
        shared_inputs: every group's modules read one and the same input tensor (the groups of
            :func:`~lightning_sparse.calibration.shared_input_groups`): then nothing a group's pass needs depends on
            their outputs, so ``nn.Linear`` and HF ``Conv1D`` modules of the group called once per pass return zeros
            instead of computing.
        sequence: the names of the submodules in the order one pass enters them (default: found by one pass).
    """

    def __init__(self, block: nn.Module, calls: Sequence[tuple[tuple, dict]], groups: Sequence[Sequence[str]],
                 stop_early: Sequence[bool] | None = None, shared_inputs: bool = False,
                 sequence: Sequence[str] | None = None) -> None:
        self.block, self.calls, self.groups = block, calls, [list(group) for group in groups]
        self.stop_early = list(stop_early) if stop_early is not None else [True] * len(self.groups)
        self.shared_inputs = shared_inputs
        sequence = list(sequence) if sequence is not None else _call_sequence(block, calls[0])
        counts = Counter(sequence)
        self.entered = {name: counts[name] for group in self.groups for name in group}
        self.entry: dict[str, int] = {}
        for index, name in enumerate(sequence):
            self.entry.setdefault(name, index)  # its first call
        self.modules = dict(block.named_modules())
        self.single = [name for name in sequence if counts[name] == 1]
        self.widths = [_hidden(call).numel() for call in calls]
        self.memo: list[dict[str, tuple[Any, list[Tensor], list[int]]]] = [{} for _ in calls]
        self.fixed = [self._replayable(group) for group in range(len(self.groups))]  # per group, once

    def _replayable(self, group: int) -> list[str]:
        """The outermost modules whose outputs cannot change once ``group`` is pruned."""
        owners = self.groups[group]
        first = min((self.entry[name] for name in owners if name in self.entry), default=len(self.entry))
        fixed = {name for name in self.single
                 if self.entry[name] < first and not any(_inside(name, owner) for owner in owners)}
        return [name for name in fixed if name.rpartition(".")[0] not in fixed]

    def run(self, group: int, index: int) -> Any:
        """Pass ``index`` for ``group`` (``group == len(groups)``: the full pass after the last group, whose output is
        returned; otherwise the pass stops once the group's modules were entered, when it may)."""
        memo = self.memo[index]
        replay = self.fixed[group - 1] if group > 0 else []
        keep = self.fixed[group] if group < len(self.groups) else []
        fresh: dict[str, tuple[Any, list[Tensor], list[int]]] = {}
        handles = [self._replay(name, memo) for name in replay if name in memo]
        handles += [self.modules[name].register_forward_hook(self._keeper(name, fresh, self.widths[index]))
                    for name in keep]
        if group < len(self.groups) and self.stop_early[group]:
            handles += self._stoppers(self.groups[group])
            if self.shared_inputs:
                handles += [self._zeros(name) for name in self.groups[group] if self.entered[name] == 1]
        args, kwargs = self.calls[index]
        try:
            return self.block(*args, **kwargs)
        except _Stop:
            reshard_after_abort(self.block)
            return None
        finally:
            for handle in handles:
                handle.remove()
            self.memo[index] = fresh

    def _replay(self, name: str, memo: dict) -> _Restore:
        module = self.modules[name]
        original = module.forward
        output, tensors, versions = memo[name]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if [t._version for t in tensors] == versions:
                return output
            return original(*args, **kwargs)  # changed in place since it was kept: run the module

        restore = _Restore(module)
        module.forward = forward
        return restore

    def _zeros(self, name: str) -> _Restore:
        """Make module ``name`` return zeros of its output's shape: in this pass its output is never used."""
        module = self.modules[name]
        features = _output_features(module)
        restore = _Restore(module)
        if features is not None:
            module.forward = lambda x, *_, **__: x.new_zeros(*x.shape[:-1], features)
        return restore

    def _keeper(self, name: str, fresh: dict, width: int) -> Callable:
        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            tensors = _tensors(output)
            if tensors is not None and sum(t.numel() for t in tensors) <= width:
                fresh[name] = (output, tensors, [t._version for t in tensors])

        return keep

    def _stoppers(self, owners: Sequence[str]) -> list:
        remaining = [sum(self.entered[name] for name in owners)]

        def count(*_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                raise _Stop

        return [self.modules[name].register_forward_pre_hook(count) for name in owners]


class _Restore:
    """A handle that puts a module's own ``forward`` back."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.own = module, module.__dict__.get("forward")  # an instance's own forward, if it had one

    def remove(self) -> None:
        if self.own is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.own
