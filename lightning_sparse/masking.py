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

import torch
from torch import Tensor, nn

from lightning_sparse.core.masks import count_true, flat_nonzero
from lightning_sparse.core.patterns import Pattern, Unstructured


class MaskState:
    """Masks of named parameters, all ones at first.

    Args:
        params: parameter name -> parameter.
        pattern: the grouping used to store masks compactly in :meth:`state_dict` (blocks as block masks).
        layouts: parameter name -> ``True`` for a weight stored ``(in, out)`` (HF ``Conv1D``): its pattern runs along
            its first dimension (see :meth:`pattern_of`).
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
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        self._multipliers: dict[str, Tensor] = {}

    def set_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace masks; returns, per parameter, the positions whose state changed (new XOR old)."""
        changed = {}
        for name, mask in masks.items():
            mask = mask.to(device=self.params[name].device, dtype=torch.bool)
            changed[name] = mask ^ self.masks[name]
            self.masks[name] = mask
            if count_true(mask) == mask.numel():
                self._multipliers.pop(name, None)
            else:  # through uint8: the same 0/1 values, 3x faster than bool -> float on the CPU
                self._multipliers[name] = mask.view(torch.uint8).to(self.params[name].dtype)
        return changed

    def pattern_of(self, name: str) -> Pattern:
        """The pattern as it applies to the stored tensor of ``name`` (its layer's layout)."""
        return self.patterns[name]

    def multiplier(self, name: str) -> Tensor:
        """The mask of ``name`` as 0/1 values of the weight's dtype (bool when it keeps everything)."""
        return self._multipliers.get(name, self.masks[name])

    def _masked(self) -> tuple[list[Tensor], list[Tensor]]:
        names = list(self._multipliers)
        return [self.params[n] for n in names], [self._multipliers[n] for n in names]

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every masked-out weight (one fused multiply over all parameters)."""
        params, multipliers = self._masked()
        if params:
            torch._foreach_mul_([p.data for p in params], multipliers)

    @torch.no_grad()
    def clear_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], positions: Mapping[str, Tensor]
    ) -> None:
        """Zero every per-element optimizer state (momentum, Adam moments, ...) at ``positions`` (bool masks).

        Contiguous states are filled through the positions' flat indices (few positions change per update: much
        cheaper than a masked fill over the whole tensor); others with a masked fill."""
        optimizers = list(optimizers)
        for name, where in positions.items():
            states = [value for optimizer in optimizers for value in optimizer.state.get(self.params[name], {}).values()
                      if isinstance(value, Tensor) and value.shape == where.shape]
            indices = flat_nonzero(where) if states else None
            for value in states:
                if value.is_contiguous():
                    value.view(-1).index_fill_(0, indices.to(value.device), 0)
                else:
                    value.masked_fill_(where.to(value.device), 0)

    @torch.no_grad()
    def names_with_weights_outside_mask(self) -> list[str]:
        """Parameters that hold a non-zero weight where their mask is False."""
        return [name for name, m in self._multipliers.items() if (self.params[name] * (1 - m)).any()]

    def density(self, name: str) -> float:
        """Fraction of ``name``'s mask that is kept."""
        mask = self.masks[name]
        return count_true(mask) / mask.numel()

    def global_density(self) -> float:
        """Fraction kept over all masked parameters together."""
        kept = sum(count_true(m) for m in self.masks.values())
        return kept / sum(m.numel() for m in self.masks.values())

    def state_dict(self) -> dict[str, Tensor]:
        """Masks as bool tensors on the CPU; block patterns store one bit per block."""
        return {name: self.patterns[name].compress(mask).cpu().clone() for name, mask in self.masks.items()}

    def check_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``state`` holds one mask of the right size for every parameter."""
        if set(state) != set(self.params):
            raise ValueError(
                f"the checkpoint's masks do not match the model: checkpoint has {sorted(state)}, "
                f"the callback targets {sorted(self.params)}"
            )
        for name, stored in state.items():
            expected = tuple(self.patterns[name].compress(self.masks[name]).shape)
            if tuple(stored.shape) != expected:
                raise ValueError(
                    f"the checkpoint's mask for {name} has shape {tuple(stored.shape)} but the model's {name} of shape "
                    f"{tuple(self.params[name].shape)} needs {expected} under pattern {self.pattern}"
                )

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` (does not touch the weights)."""
        self.check_state_dict(state)
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self.set_masks({name: self.patterns[name].expand(stored, shapes[name]) for name, stored in state.items()})
