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

Under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) the hooks give way at fit start to a
:class:`~lightning_sparse.callbacks.masked_fsdp2.ShardedForward`: each rank writes its rows of the effective weight
into its shard before the forward passes of a step, FSDP2 all-gathers them, and before the optimizer step the dense
rows come back with the gradient carried to them on the local rows (see that module for why, and what it costs).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_sparse.callbacks._run_end import RESUME_WEIGHTS
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.masked_fsdp2 import ShardedForward, autograd_gradients
from lightning_sparse.masked_forward import MaskedForward

BAKED = "baked_without_training_state"


class MaskedForwardCallback(SparsityCallback):
    """Base class: dense weights, masked forward, bake at the end (see the module docstring).

    Args:
        density: see :class:`~lightning_sparse.callbacks.base.SparsityCallback`; likewise ``pattern``,
            ``distribution``, ``include``, ``exclude``, ``skip_first``, ``skip_last``, ``update_every``, ``seed``.
        bake_at_end: call :meth:`bake` when training ends; with False the hooks stay and the model keeps computing
            with the masked weights until you call :meth:`bake`.

    Raises:
        ValueError: at fit start under FSDP2, for a target that is not sharded while others are (a plain tensor
            beside ``fully_shard`` ed ones), naming it.
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
        self._sharded: ShardedForward | None = None

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        """The tensor the forward uses for target ``name`` (differentiable in ``weight``)."""
        raise NotImplementedError

    def _forward_weight(self, name: str, weight: nn.Parameter) -> Tensor:
        return weight if self.last_update_step < 0 else self.effective_weight(name, weight)

    def local_effective_weight(self, name: str, rows: Tensor) -> Tensor:
        """This rank's rows of the effective weight of ``name`` from its dense ``rows`` (FSDP2; no graph needed)."""
        return self.effective_weight(name, rows)

    def local_gradients(self, dense: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """FSDP2: dL/d(dense rows) from the dense rows and dL/d(effective rows) of each target (autograd through
        :meth:`effective_weight` on the local rows)."""
        return autograd_gradients(self.effective_weight, dense, grads)

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
        if self._sharded is not None:
            self._sharded.swap_out()
            self._sharded = None

    # ----------------------------------------------------------------------------------------- FSDP2
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under FSDP2, replace the forward hooks by a :class:`ShardedForward` of the sharded targets."""
        super().on_fit_start(trainer, pl_module)
        plain = [name for name, shard in self.masks.shards.items() if shard is None]
        if self.masks.sharded and plain:
            raise ValueError(f"{type(self).__name__}: under FSDP2 every target must be sharded, but {plain[0]} is a "
                             "plain tensor; apply fully_shard to the module that holds it (or to the root) in "
                             f"configure_model, or exclude {plain[0]!r}")
        if self.masks.sharded and self._forward is not None:
            self._forward.remove()
            self._forward = None
            self._sharded = ShardedForward(self.masks.params)

    def _swap_in(self, *args) -> None:
        if self._sharded is not None and self.last_update_step >= 0:
            self._sharded.swap_in(self.local_effective_weight)

    def _swap_out(self, *args) -> None:
        if self._sharded is not None:
            self._sharded.swap_out()

    on_train_batch_start = on_validation_start = on_test_start = on_predict_start = _swap_in
    on_validation_end = on_test_end = on_predict_end = on_exception = _swap_out

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._sharded is not None:
            self._sharded.swap_out(self.local_gradients)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._swap_out()  # dense rows for the mask update and for checkpoints, also after a microbatch
        super().on_train_batch_end(trainer, pl_module, *args)

    @torch.no_grad()
    def effective_weights(self) -> dict[str, Tensor]:
        """``{name: effective weight}`` of every target: exactly what the forward computes with (under FSDP2, this
        rank's rows of it)."""
        if self._sharded is not None:
            rows = {name: self._sharded.rows(name) for name in self.masks.params}
            return {name: (r if self.last_update_step < 0 else self.local_effective_weight(name, r)).clone()
                    for name, r in rows.items()}
        return {name: self._forward_weight(name, param).detach().clone() for name, param in self.masks.params.items()}

    @property
    def baked(self) -> bool:
        """Whether :meth:`bake` has written the effective weights into the parameters (no masked forward is left)."""
        return self._forward is None and self._sharded is None

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
        self._swap_out()
        if keep_training_state:
            self.keep_resume_state()
        self._baked_without_state = not keep_training_state and self._resume_state is None
        for name, weight in self.effective_weights().items():
            self.masks.local_param(name).copy_(weight)
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
