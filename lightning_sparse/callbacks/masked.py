r"""``MaskedForwardCallback``: the base of algorithms that keep dense weights and mask the forward pass.

Spartan and Top-KAST train dense weights :math:`w` and compute with an effective weight (e.g. :math:`w \odot h`).
The forward reads it through :class:`~lightning_sparse.masked_forward.MaskedForward`, so parameter names,
``state_dict`` keys and the optimizer's parameter objects never change. ``self.masks`` (a :class:`MaskState`)
records the current hard masks; the weights themselves are never zeroed during training. Before the first mask
update (e.g. the sanity-check validation that precedes training) the forward is dense.

Until :meth:`~MaskedForwardCallback.bake` runs, ``model.state_dict()`` (and every checkpoint written during training)
holds the plain *dense* weights: resuming from it is exact, but a plain model loaded from it computes the dense
model. :meth:`~MaskedForwardCallback.bake` writes the effective weights into the parameters and removes the hooks; it
runs when training ends (``bake_at_end=True``), so the model returned by ``fit`` and any checkpoint saved after it
equal the trained forward and load strictly into a model that never saw this library. So test the fitted model
(``trainer.test(model)``, ``ckpt_path=None``), not ``ckpt_path="best"``: that reloads dense weights from a checkpoint
written during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.masked_forward import MaskedForward


class MaskedForwardCallback(SparsityCallback):
    """Base class: dense weights, masked forward, bake at the end (see the module docstring).

    Args:
        density: see :class:`~lightning_sparse.callbacks.base.SparsityCallback`; likewise ``pattern``,
            ``distribution``, ``include``, ``exclude``, ``skip_first``, ``skip_last``, ``update_every``, ``seed``.
        bake_at_end: call :meth:`bake` when training ends; with False the hooks stay and the model keeps computing
            with the masked weights until you call :meth:`bake`.
    """

    hard_mask = False

    def __init__(
        self,
        density: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "uniform",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int = 100,
        seed: int = 0,
        bake_at_end: bool = True,
    ) -> None:
        super().__init__(density, pattern, distribution, include, exclude, skip_first, skip_last, update_every, seed)
        self.bake_at_end = bool(bake_at_end)
        self._forward: MaskedForward | None = None

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        """The tensor the forward uses for target ``name`` (differentiable in ``weight``)."""
        raise NotImplementedError

    def _forward_weight(self, name: str, weight: nn.Parameter) -> Tensor:
        return weight if self.last_update_step < 0 else self.effective_weight(name, weight)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.remove_hooks()
            self._forward = MaskedForward(pl_module, {n: partial(self._forward_weight, n) for n in self.masks.params})

    def remove_hooks(self) -> None:
        """Make the model compute with its plain parameters again (without baking)."""
        if self._forward is not None:
            self._forward.remove()
            self._forward = None

    @torch.no_grad()
    def effective_weights(self) -> dict[str, Tensor]:
        """``{name: effective weight}`` of every target: exactly what the forward computes with."""
        return {name: self._forward_weight(name, param).detach().clone() for name, param in self.masks.params.items()}

    @property
    def baked(self) -> bool:
        """Whether :meth:`bake` has written the effective weights into the parameters (no masked forward is left)."""
        return self._forward is None

    @torch.no_grad()
    def bake(self) -> None:
        """Write the effective weights into the parameters and remove the hooks: the plain model now computes what
        the masked forward computed, and its ``state_dict`` is the sparse model. Calling it again does nothing (a
        second bake would apply a soft mask twice)."""
        if self.baked:
            return
        for name, weight in self.effective_weights().items():
            self.masks.params[name].copy_(weight)
        self.remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bake_at_end:
            self.bake()
