"""``MaskState``: the boolean masks of a set of parameters, and what they do to weights and optimizer state.

Masks are keyed by parameter name (FQN). Parameters are never renamed or re-parametrised: a masked weight is
physically zero: it is re-zeroed after every optimizer step, and optimizer state is cleared where a mask changes.

Example::

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> state = MaskState({"weight": layer.weight})
    >>> changed = state.set_masks({"weight": torch.tensor([[True, False] * 2] * 2)})
    >>> state.apply_to_weights()
    >>> int((layer.weight != 0).sum()), state.density("weight")
    (4, 0.5)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.masks import count_true, flat_nonzero
from lightning_sparse.core.patterns import Pattern, Unstructured
from lightning_sparse.distributed import all_reduce_sum, gather_rows, local, shard_of
from lightning_sparse.mask_checkpoint import PACKED, is_packed, is_reference, load_sharded, unpack_bits


class MaskState:
    """Masks of named parameters, all ones at first.

    Args:
        params: parameter name -> parameter.
        pattern: the grouping used to store masks compactly in :meth:`state_dict` (blocks as block masks).
        layouts: parameter name -> ``True`` for a weight stored ``(in, out)`` (HF ``Conv1D``): its pattern runs along
            its first dimension (see :meth:`pattern_of`).

    An FSDP2 parameter (a ``DTensor`` sharded on dim 0) gets a mask of its local rows only (:attr:`shards` says
    where they sit); weights, optimizer state and masks are touched shard by shard. :meth:`state_dict` gathers each
    mask whole (every rank must call it: Lightning does) and :meth:`load_state_dict` keeps this rank's rows, so a
    checkpoint resumes under any number of ranks, or on one device.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        pattern: Pattern | None = None,
        layouts: Mapping[str, bool] | None = None,
    ) -> None:
        self.params = dict(params)
        self.pattern = pattern or Unstructured()
        self.patterns = {name: self.pattern.for_layout(bool((layouts or {}).get(name))) for name in self.params}
        self.shards = {name: shard_of(p, name) for name, p in self.params.items()}
        self.masks = {name: torch.ones_like(local(p.data), dtype=torch.bool) for name, p in self.params.items()}
        self._multipliers: dict[str, Tensor] = {}

    def set_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace masks; returns, per parameter, the positions whose state changed (new XOR old)."""
        changed = {}
        for name, mask in masks.items():
            mask = mask.to(device=self.masks[name].device, dtype=torch.bool)
            changed[name] = mask ^ self.masks[name]
            self.masks[name] = mask
            if count_true(mask) == mask.numel():
                self._multipliers.pop(name, None)
            elif self.shards[name] is not None:  # FSDP2 is for models that do not fit: no float copy of a mask
                self._multipliers[name] = mask
            else:  # through uint8: the same 0/1 values, 3x faster than bool -> float on the CPU
                self._multipliers[name] = mask.view(torch.uint8).to(self.params[name].dtype)
        return changed

    def local_param(self, name: str) -> Tensor:
        """This rank's shard of parameter ``name`` (the parameter itself when it is not sharded)."""
        return local(self.params[name].data)

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards."""
        return any(shard is not None for shard in self.shards.values())

    def pattern_of(self, name: str) -> Pattern:
        """The pattern as it applies to the stored tensor of ``name`` (its layer's layout)."""
        return self.patterns[name]

    def multiplier(self, name: str) -> Tensor:
        """The mask of ``name`` as 0/1 values of the weight's dtype (bool when it keeps everything, and for FSDP2
        shards: one byte per weight, the multiply about 2x slower)."""
        return self._multipliers.get(name, self.masks[name])

    def _masked(self) -> tuple[list[Tensor], list[Tensor]]:
        names = list(self._multipliers)
        return [self.params[n] for n in names], [self._multipliers[n] for n in names]

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every masked-out weight (one fused multiply over all parameters)."""
        params, multipliers = self._masked()
        if params:
            torch._foreach_mul_([local(p.data) for p in params], multipliers)

    @torch.no_grad()
    def clear_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], positions: Mapping[str, Tensor]
    ) -> None:
        """Zero every per-element optimizer state (momentum, Adam moments, ...) at ``positions`` (bool masks).

        Contiguous states are filled through the positions' flat indices (few positions change per update: much
        cheaper than a masked fill over the whole tensor); others with a masked fill."""
        optimizers = list(optimizers)
        for name, where in positions.items():
            states = [local(value) for optimizer in optimizers for value in optimizer.state.get(self.params[name], {})
                      .values() if isinstance(value, Tensor) and tuple(local(value).shape) == tuple(where.shape)]
            indices = flat_nonzero(where) if states else None
            for value in states:
                if value.is_contiguous():
                    value.view(-1).index_fill_(0, indices.to(value.device), 0)
                else:
                    value.masked_fill_(where.to(value.device), 0)

    @torch.no_grad()
    def names_with_weights_outside_mask(self) -> list[str]:
        """Parameters that hold a non-zero weight where their mask is False."""
        return [name for name, m in self._multipliers.items() if (self.local_param(name) * (1 - m)).any()]

    def _counts(self, names: Iterable[str]) -> tuple[int, int]:
        names = list(names)
        counts = torch.tensor([[count_true(self.masks[n]), self.masks[n].numel()] for n in names], dtype=torch.int64)
        sharded = [n for n in names if self.shards[n] is not None]
        if sharded:  # every rank holds other rows: sum over the shards' group
            counts = all_reduce_sum(counts, self.shards[sharded[0]].group)
        return int(counts[:, 0].sum()), int(counts[:, 1].sum())

    def density(self, name: str) -> float:
        """Fraction of ``name``'s mask that is kept (over all shards: every rank must call it)."""
        kept, total = self._counts([name])
        return kept / total

    def global_density(self) -> float:
        """Fraction kept over all masked parameters together."""
        kept, total = self._counts(self.masks)
        return kept / total

    def full_mask(self, name: str) -> Tensor:
        """The whole mask of ``name`` on the CPU (gathered from every shard: every rank must call it)."""
        shard = self.shards[name]
        if shard is None:
            return self.masks[name].cpu()
        return gather_rows(self.masks[name], shard).cpu()

    def state_dict(self) -> dict[str, Tensor]:
        """Whole masks as bool tensors on the CPU; block patterns store one bit per block."""
        return {name: self.patterns[name].compress(self.full_mask(name)).clone() for name in self.masks}

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` holds one mask of the right size for every parameter (whole masks,
        or a reference to masks in a distributed checkpoint, or whole packed masks: see
        :mod:`lightning_sparse.mask_checkpoint`)."""
        names = sorted(state["shapes"]) if is_reference(state) or is_packed(state) else sorted(state)
        if names != sorted(self.params):
            raise ValueError(
                f"the checkpoint's masks do not match the model: checkpoint has {names}, "
                f"the callback targets {sorted(self.params)}"
            )
        if is_reference(state) or is_packed(state):
            for name, shape in state["shapes"].items():
                if tuple(shape) != tuple(self.params[name].shape):
                    raise ValueError(f"the checkpoint's mask for {name} has shape {tuple(shape)} but the model's "
                                     f"{name} has shape {tuple(self.params[name].shape)}")
            return
        for name, stored in state.items():
            whole = torch.ones(tuple(self.params[name].shape), dtype=torch.bool, device="meta")
            expected = tuple(self.patterns[name].compress(whole).shape)
            if tuple(stored.shape) != expected:
                raise ValueError(
                    f"the checkpoint's mask for {name} has shape {tuple(stored.shape)} but the model's {name} of shape "
                    f"{tuple(self.params[name].shape)} needs {expected} under pattern {self.pattern}"
                )

    def load_state_dict(self, state: Mapping[str, Any], path: str | Path | None = None) -> None:
        """Restore masks saved by :meth:`state_dict` (does not touch the weights); ``path``: the distributed
        checkpoint that holds the masks a reference points to (every rank reads its rows)."""
        self.check_state_dict(state)
        if is_reference(state):
            if path is None:
                raise ValueError("the checkpoint's masks are in a distributed checkpoint, but no checkpoint path was "
                                 "given to read them from")
            self.set_masks(load_sharded(path, state, self.params, self.shards))
            return
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        if is_packed(state):
            masks = {name: unpack_bits(packed, shapes[name]) for name, packed in state[PACKED].items()}
        else:
            masks = {name: self.patterns[name].expand(stored, shapes[name]) for name, stored in state.items()}
        for name, shard in self.shards.items():
            if shard is not None:
                masks[name] = masks[name][shard.row_offset : shard.row_offset + shard.rows]
        self.set_masks(masks)
