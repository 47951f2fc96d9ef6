"""``MagnitudePruning``: gradual (GMP), one-shot and iterative magnitude pruning with optional rewinding.

* **Gradual** (Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878): with a :class:`SparsityScheduler`, every
  ``update_every`` optimizer steps between the schedule's start and end, keep the largest-magnitude weights at
  the scheduled density.
* **One-shot**: without a scheduler, prune once to ``density`` at optimizer step ``at_step`` (default 0, before
  training); the mask then stays fixed.
* **Iterative** (IMP, lottery tickets, Frankle & Carbin 2019, https://arxiv.org/abs/1803.03635): a scheduler
  with ``shape="exponential"`` and a large ``update_every`` prunes the same fraction every round; with
  ``rewind_to=k`` the surviving weights are reset to their values at step ``k`` after each round.

Scores are ``|w|``, grouped by the pattern (block mean, or per N:M group); budgets are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.core.scores import magnitude
from lightning_sparse.distributed import gather_rows


class MagnitudePruning(SparsityCallback):
    """Keep the largest-magnitude weights: gradual, one-shot or iterative.

    Args:
        density: fraction of weights kept at the end, in (0, 1] (leave ``None`` when a scheduler gives it).
        pattern: ``"unstructured"``, ``"RxC"`` blocks or ``"N:M"``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"``.
        include: glob patterns of parameter names to prune (default: Linear, Conv, attention weights).
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between pruning steps under a scheduler (the schedule's end step prunes too).
        at_step: one-shot pruning at this optimizer step (ignores the scheduler); default: step 0 when there is
            no scheduler.
        rewind_to: after every pruning step, reset the kept weights to their values at this optimizer step.
        seed: seed of the callback's generator.

    Raises:
        ValueError: see :class:`~lightning_sparse.callbacks.base.SparsityCallback`; also ``at_step < 0`` or
            ``rewind_to < 0``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import MagnitudePruning, SparsityScheduler

        gmp = [SparsityScheduler(density=0.1, end=0.75), MagnitudePruning(update_every=50)]
        one_shot = [MagnitudePruning(density=0.5, pattern="2:4", at_step=1000)]
        trainer = Trainer(max_epochs=5, callbacks=gmp)
    """

    supports_fsdp2 = True

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
        at_step: int | None = None,
        rewind_to: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(density, pattern, distribution, include, exclude, skip_first, skip_last, update_every, seed)
        self.at_step = None if at_step is None else check_int("at_step", at_step, 0)
        self.rewind_to = None if rewind_to is None else check_int("rewind_to", rewind_to, 0)
        self.rewind_weights: dict[str, Tensor] | None = None

    def should_update(self, step: int) -> bool:
        if self.at_step is not None or self._scheduler is None:
            return step == (self.at_step or 0)
        start, end = self._scheduler.window()
        return start <= step <= end and ((step - start) % self.update_every == 0 or step == end)

    def target_density(self, step: int) -> float:
        if self.at_step is not None:
            return self.final_density
        return super().target_density(step)

    @property
    def _one_shot(self) -> bool:
        return self.at_step is not None or self._scheduler is None

    @property
    def schedule_end(self) -> int:
        return (self.at_step or 0) if self._one_shot else super().schedule_end

    @property
    def schedule_argument(self) -> str:
        return f"at_step={self.at_step}" if self.at_step is not None else super().schedule_argument

    def scheduled_density(self, step: int) -> float:
        """Dense before a one-shot prune, the final density from it on; else the schedule's density."""
        if self._one_shot:
            return self.final_density if step >= (self.at_step or 0) else 1.0
        return super().scheduled_density(step)

    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        scores = {name: magnitude(self.masks.local_param(name)) for name in self.masks.params}
        global_density = self.target_density(step) if self.distribution == "global" else None
        densities, fixed = self.layer_densities(step), set(self.layer_overrides)
        return self.select(scores, densities, global_density, fixed)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.rewind_to is not None and step == self.rewind_to and self.rewind_weights is None:
            self.rewind_weights = {name: self.masks.local_param(name).clone() for name in self.masks.params}

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        changed = super().update_masks(trainer, pl_module, step)
        if self.rewind_weights is not None and step > (self.rewind_to or 0) and not self._fit_ending:
            with torch.no_grad():
                for name in self.masks.params:
                    self.masks.local_param(name).copy_(self.rewind_weights[name] * self.masks.masks[name])
        return changed

    def extra_state_dict(self) -> dict[str, Any]:
        if self.rewind_weights is None:
            return {}
        shards = self.masks.shards
        return {"rewind_weights": {name: (w if shards[name] is None else gather_rows(w, shards[name])).cpu()
                                   for name, w in self.rewind_weights.items()}}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("rewind_weights")
        if weights is not None:
            self.rewind_weights = {name: self._local_rows(name, w).to(self.masks.masks[name].device)
                                   for name, w in weights.items()}

    def _local_rows(self, name: str, whole: Tensor) -> Tensor:
        shard = self.masks.shards[name]
        return whole if shard is None else whole[shard.row_offset : shard.row_offset + shard.rows].clone()
