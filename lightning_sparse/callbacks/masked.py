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

A checkpoint saved after the bake (``trainer.save_checkpoint`` after ``fit`` returned, after an early stop or after
``trainer.validate``/``test``) still resumes exactly: :meth:`~MaskedForwardCallback.bake` first keeps the dense
weights and the callback's state (on the CPU), checkpoints hold them in the callback's state, and a resumed run puts
them back at train start. ``bake(keep_training_state=False)`` keeps nothing (no host copy of the weights); a
checkpoint saved after it is refused by a resume, with a message that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_sparse.callbacks._run_end import RESUME_WEIGHTS
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.masked_forward import MaskedForward

BAKED = "baked_without_training_state"


class MaskedForwardCallback(SparsityCallback):
    """Base class: dense weights, masked forward, bake at the end (see the module docstring).

    Args:
        density: see :class:`~lightning_sparse.callbacks.base.SparsityCallback`; likewise ``pattern``,
            ``distribution``, ``include``, ``exclude``, ``skip_first``, ``skip_last``, ``update_every``, ``seed``.
        bake_at_end: call :meth:`bake` when training ends; with False the hooks stay and the model keeps computing
            with the masked weights until you call :meth:`bake`.
    """

    hard_mask = False
    _baked_without_state: bool = False

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
    def bake(self, keep_training_state: bool = True) -> None:
        """Write the effective weights into the parameters and remove the hooks: the plain model now computes what
        the masked forward computed, and its ``state_dict`` is the sparse model. Calling it again does nothing (a
        second bake would apply a soft mask twice).

        Args:
            keep_training_state: first keep the dense weights and the callback's state (a CPU copy of the targets),
                so that checkpoints saved afterwards still resume exactly; with False they are refused by a resume.
        """
        if self.baked:
            return
        if keep_training_state:
            self.keep_resume_state()
        self._baked_without_state = not keep_training_state and self._resume_state is None
        for name, weight in self.effective_weights().items():
            self.masks.params[name].copy_(weight)
        self.remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.bake_at_end:
            self.bake()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if self._baked_without_state and state:
            state[BAKED] = True

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Refuse to resume from a checkpoint saved after ``bake(keep_training_state=False)``: its weights are the
        baked ones, not the dense weights training needs."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if state.get(BAKED) and RESUME_WEIGHTS not in state:
            raise ValueError(
                f"this checkpoint was saved after {type(self).__name__}.bake(keep_training_state=False): it holds the "
                "baked (masked) weights, not the dense weights and state training needs. Use it for inference or "
                "export (trainer.test/validate, load_state_dict, SparseExport), not to resume; for a resumable "
                "checkpoint, save one before bake() (ModelCheckpoint during fit) or bake with "
                "keep_training_state=True (the default, also what bake_at_end does)"
            )
