r"""``TopKAST``: Top-K Always Sparse Training (Jayakumar, Pascanu, Rae, Osindero & Elsen, NeurIPS 2020).

Paper: https://arxiv.org/abs/2106.03517. Weights stay dense; the forward uses the largest-magnitude weights and the
backward updates a larger set:

.. math::

    \tilde w = w \odot A, \qquad \frac{\partial L}{\partial w} = \frac{\partial L}{\partial \tilde w} \odot B,
    \qquad A = \mathrm{top}_{D}(|w|) \subseteq B = \mathrm{top}_{D + M}(|w|),

with :math:`D` = ``density`` (exactly ``round(D * n)`` weights) and :math:`D + M` = ``backward_density``; without
``backward_density``, :math:`B` is everything (a dense straight-through gradient, the "dual averaging" form). Both
sets are recomputed every ``update_every`` optimizer steps. The paper's exploration penalty on :math:`B \setminus A`
is not part of this callback (add it to the loss when wanted).

Under FSDP2 both sets are selected on the local shards by the exact distributed top-k (the single-process sets and
tie-break), and the backward masks are gathered whole into checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_sparse.callbacks.masked import MaskedForwardCallback
from lightning_sparse.callbacks.scheduler import SparsityScheduler
from lightning_sparse.core.density import check_density
from lightning_sparse.core.scores import magnitude
from lightning_sparse.core.soft_mask import straight_through_mask
from lightning_sparse.distributed import rows_of, whole_of


class TopKAST(MaskedForwardCallback):
    r"""Top-KAST: hard top-k forward, straight-through backward to a superset (see the module docstring).

    Before :meth:`bake` the model's ``state_dict`` holds the dense weights; the exported model is
    :math:`w \odot A` (:meth:`effective_weights`), written into the parameters when training ends.

    Args:
        density: fraction of weights (blocks) used by the forward, in (0, 1]; ``None`` when a scheduler gives it.
        backward_density: fraction of weights that receive gradients (per layer at least its forward density;
            one global budget under ``distribution="global"``); ``None``: every weight (dense gradient).
        pattern: ``"unstructured"``, ``"RxC"`` blocks or ``"N:M"``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"``.
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to leave dense.
        skip_first: leave the first target dense.
        skip_last: leave the last target dense.
        update_every: optimizer steps between mask updates (also at the schedule's end step and at fit end).
        seed: seed of the callback's generator.
        bake_at_end: write the effective weights into the parameters when training ends.

    Raises:
        ValueError: for densities outside (0, 1], ``backward_density < density`` (also against the scheduler's
            final density, in ``setup``), or any error of :class:`~lightning_sparse.callbacks.base.SparsityCallback`.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import TopKAST

        trainer = Trainer(max_epochs=10, callbacks=[TopKAST(density=0.1, backward_density=0.2, update_every=10)])
    """

    supports_fsdp2 = True

    def __init__(
        self,
        density: float | None = None,
        backward_density: float | None = None,
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
        super().__init__(density, pattern, distribution, include, exclude, skip_first, skip_last, update_every, seed,
                         bake_at_end)
        self.backward_density = None if backward_density is None else check_density(backward_density,
                                                                                     "backward_density")
        self._check_backward(self.density)
        self.backward_masks: dict[str, Tensor] = {}
        self._backward_multipliers: dict[str, Tensor] = {}

    def _check_backward(self, density: float | None) -> None:
        if self.backward_density is not None and density is not None and self.backward_density < density:
            raise ValueError(f"backward_density must be >= the density {density}, got {self.backward_density}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        scheduler = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityScheduler)), None)
        if stage == "fit" and scheduler is not None:
            self._check_backward(scheduler.final_density)

    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        scores = {name: magnitude(self.masks.local_param(name)) for name in self.masks.params}
        densities, target = self.layer_densities(step), self.target_density(step)
        fixed = set(self.layer_overrides)
        pooled = target if self.distribution == "global" else None
        masks = self.select(scores, densities, pooled, fixed)
        if self.backward_density is not None:
            backward = {name: max(d, self.backward_density) for name, d in densities.items()}
            overall = max(target, self.backward_density) if self.distribution == "global" else None
            wider = self.select(scores, backward, overall, fixed)
            self._set_backward_masks({name: wider[name] | masks[name] for name in masks})
        return masks

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        return straight_through_mask(weight, self.masks.multiplier(name), self._backward_multipliers.get(name))

    def _set_backward_masks(self, masks: dict[str, Tensor]) -> None:
        """Keep the backward masks, and as 0/1 values of each weight's dtype (a multiply is faster than a select;
        under FSDP2 the bool masks themselves: no float copy of a mask)."""
        self.backward_masks = masks
        params = self.masks.params
        self._backward_multipliers = {name: mask if self.masks.shards[name] is not None else mask.to(params[name].dtype)
                                      for name, mask in masks.items()}

    def extra_state_dict(self) -> dict[str, Any]:
        """The backward masks, whole (gathered from every shard under FSDP2 when the checkpoint is one file: every rank
        calls it), compressed; a distributed checkpoint stores them rank by rank instead (sharded_state_tensors)."""
        if self.saves_sharded:
            return {}
        shards, compress = self.masks.shards, self.masks.pattern_of
        return {"backward_masks": {name: compress(name).compress(whole_of(m, shards[name]).cpu())
                                   for name, m in self.backward_masks.items()}}

    def sharded_state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"backward_masks": self.backward_masks} if self.backward_masks else {}

    def load_sharded_state_tensors(self, kind: str, tensors: dict[str, Tensor]) -> None:
        self._set_backward_masks({name: t.to(self.masks.masks[name].device) for name, t in tensors.items()})

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        params, shards = self.masks.params, self.masks.shards

        def whole(name: str, stored: Tensor) -> Tensor:  # compressed, or whole (a consolidated FSDP2 checkpoint)
            shape = tuple(params[name].shape)
            return stored.bool() if tuple(stored.shape) == shape else self.masks.pattern_of(name).expand(stored, shape)

        if "backward_masks" in state:  # else: none yet, or read rank by rank (load_sharded_state_tensors)
            self._set_backward_masks({
                name: rows_of(whole(name, m), shards[name]).to(self.masks.masks[name].device)
                for name, m in state["backward_masks"].items()
            })
