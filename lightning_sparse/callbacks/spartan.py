r"""``Spartan``: sparse training with a differentiable soft top-k mask (Tai, Tian & Lim, NeurIPS 2022).

Paper: https://arxiv.org/abs/2205.14107. Weights stay dense; the forward computes with

.. math::

    \tilde w = w \odot m \odot \mathbb{1}[m \ge \tau], \qquad m_i = \sigma\big(\beta (u_i - t)\big), \qquad
    \sum_i c_i m_i = \rho \sum_i c_i,

where :math:`u_i` is the unit value of entry :math:`i` (:math:`|w_i|`, or the mean :math:`|w|` of a block, divided
by the per-weight FLOPs under ``cost="flops"``), :math:`\rho` the scheduled density, :math:`\beta` the scheduled
sharpness and :math:`\tau` the soft value of the last entry of the exact hard top-k (exactly ``round(rho * n)``
entries kept). The gradient passes the hard mask straight through and differentiates the soft mask implicitly
(:mod:`lightning_sparse.core.soft_mask`), so pruned weights keep learning and can come back.

Under FSDP2 every budget is solved on the local shards (:mod:`lightning_sparse.callbacks.spartan_sharded`: the exact
hard top-k, the soft threshold from all-reduced sums) and the frozen soft values are gathered whole into checkpoints;
``cost="flops"`` is refused there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sparse.callbacks._args import check_choice, check_positive, check_step
from lightning_sparse.callbacks._run_end import planned_steps
from lightning_sparse.callbacks.masked import MaskedForwardCallback
from lightning_sparse.callbacks.scheduler import SparsityScheduler, find_scheduler
from lightning_sparse.callbacks.spartan_budget import Budget, solve_budget
from lightning_sparse.callbacks.spartan_sharded import (
    local_groups,
    sharded_gradients,
    solve_sharded_budgets,
    whole_groups,
)
from lightning_sparse.core.patterns import NM, Blocks
from lightning_sparse.core.schedules import Schedule, resolve_step
from lightning_sparse.core.soft_mask import soft_group_values, spartan_weight

COSTS = ("params", "flops")
DEFAULT_SHARPNESS = 20.0
WARMUP = 0.2  # the reference's density ramp: 1 -> density over the first 20% of the run




class Spartan(MaskedForwardCallback):
    r"""Spartan: soft top-k masks, exact hard budget, frozen-mask fine-tuning (see the module docstring).

    Schedules: with a :class:`SparsityScheduler` the density (and the sharpness, when it has a ``sharpness``
    schedule) come from it; otherwise the reference's defaults: the density goes linearly from 1 to ``density``
    over the first 20% of the optimizer steps and the sharpness linearly from 1 to ``sharpness`` by ``freeze_at``.
    From ``freeze_at`` on the mask is frozen: the forward uses :math:`w \odot m_{frozen}` with the soft values kept
    on the support, as the reference does; the frozen mask is checkpointed, so a resume inside that phase stays
    frozen. :math:`\beta` is in raw :math:`|w|` units (as in the reference) and is multiplied by
    :math:`\sqrt{R C}` for ``"RxC"`` blocks (the reference scales only the final value).

    Before :meth:`bake` the model's ``state_dict`` holds the dense weights; the exported model is
    :math:`w \odot m \odot \mathbb{1}[m \ge \tau]` (:meth:`effective_weights`), written into the parameters when
    training ends (``bake_at_end=True``).

    Args:
        density: final fraction of weights (blocks) kept, in (0, 1]; ``None`` when a scheduler gives it.
        sharpness: final :math:`\beta > 0` of the default ramp (default 20, the reference's ViT-B value); leave
            ``None`` when the scheduler has a ``sharpness`` schedule. It is in raw :math:`|w|` units, so fit it to
            the model's weight scale: the SmallCNN recipe (weights of about 0.01-0.03) uses 200, which gained 13
            points over 20 at 2% density (docs/BENCHMARKS.md).
        pattern: ``"unstructured"`` or ``"RxC"`` blocks (block values are mean :math:`|w|`; densities count blocks).
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` (per-layer budgets) or ``"global"`` (one budget).
        cost: ``"params"`` (every weight costs 1) or ``"flops"`` (a conv weight costs its output's spatial size,
            recorded by the first forward pass; linear and attention weights cost 1). Costs only matter for a
            ``"global"`` budget, whose hard mask then keeps the prefix of cost closest to the budget.
        freeze_at: optimizer step (int) or fraction of the run (float) from which the mask is frozen; ``None``
            never freezes.
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to leave dense.
        skip_first: leave the first target dense.
        skip_last: leave the last target dense.
        update_every: optimizer steps between mask solves (the reference solves every step).
        seed: seed of the callback's generator.
        bake_at_end: write the effective weights into the parameters when training ends.

    Raises:
        ValueError: for a density outside (0, 1], ``sharpness <= 0``, an N:M pattern, an unknown cost or
            distribution, a bad ``freeze_at``; in ``setup``, a scheduler sharpness that is not > 0 or given twice,
            or ``cost="flops"`` under ``ModelParallelStrategy`` (FSDP2).
        TypeError: for arguments of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import Spartan

        trainer = Trainer(max_epochs=10, callbacks=[Spartan(density=0.1, sharpness=20.0, distribution="global")])
    """

    supports_fsdp2 = True

    def __init__(
        self,
        density: float | None = None,
        sharpness: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "uniform",
        cost: str = "params",
        freeze_at: int | float | None = 0.8,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int = 1,
        seed: int = 0,
        bake_at_end: bool = True,
    ) -> None:
        super().__init__(density, pattern, distribution, include, exclude, skip_first, skip_last, update_every, seed,
                         bake_at_end)
        if isinstance(self.pattern, NM):
            raise ValueError(f"Spartan supports 'unstructured' and 'RxC' block patterns, got pattern={pattern!r}")
        self.sharpness = check_positive("sharpness", sharpness)
        self.cost = check_choice("cost", cost, COSTS)
        self.freeze_at = check_step("freeze_at", freeze_at)
        self._budgets: dict[str, Budget] = {}
        self._frozen: dict[str, Tensor] | None = None
        self._costs: dict[str, float] = {}
        self._cost_hooks: list = []
        self._density_schedule: Schedule | None = None
        self._sharpness_schedule: Schedule | None = None
        self._freeze_step: int | None = None

    # ----------------------------------------------------------------------------------------- setup
    def _check_layouts(self) -> None:
        """One soft threshold spans every target, so the block must read the same in every stored layout."""
        odd = [n for n, p in self.masks.patterns.items() if p != self.pattern]
        if odd:
            raise ValueError(
                f"Spartan(pattern={str(self.pattern)!r}): {odd[0]} is stored (in, out) (HF Conv1D), where a "
                f"non-square block reads {self.masks.patterns[odd[0]]}; use a square block such as "
                f"'{self.pattern.rows}x{self.pattern.rows}', or exclude {odd[0]!r}"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._check_layouts()
        strategies = {cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__}
        if self.cost == "flops" and "ModelParallelStrategy" in strategies:
            raise ValueError("Spartan(cost='flops') is not supported under ModelParallelStrategy (FSDP2): its hard "
                             "top-k by unit value over unequal costs is not distributed; use cost='params' there")
        scheduler = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityScheduler)), None)
        schedule = None if scheduler is None else scheduler.sharpness_schedule
        if schedule is not None:
            if self.sharpness is not None:
                raise ValueError(f"Spartan(sharpness={self.sharpness}) conflicts with the SparsityScheduler's sharpness"
                                 " schedule; give the sharpness in one place")
            values = [v for v in (schedule.initial, schedule.final) if v is not None]
            if min(values) <= 0:
                raise ValueError(f"Spartan needs a sharpness > 0, got the SparsityScheduler sharpness {schedule}")
        self._costs = dict.fromkeys(self.masks.params, 1.0)
        self._record_costs(pl_module)

    def _record_costs(self, pl_module: pl.LightningModule) -> None:
        if self.cost != "flops":
            return
        for name in self.masks.params:
            owner_name, _, attribute = name.rpartition(".")
            owner = pl_module.get_submodule(owner_name)
            if attribute == "weight" and isinstance(owner, torch.nn.modules.conv._ConvNd):
                self._cost_hooks.append(owner.register_forward_hook(partial(self._record_cost, name)))

    def _record_cost(self, name: str, module: torch.nn.Module, args: Any, output: Tensor) -> None:
        self._costs[name] = float(output.shape[2 - module.weight.dim():].numel())

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for handle in self._cost_hooks:
            handle.remove()
        self._cost_hooks = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_schedules(trainer)
        super().on_train_start(trainer, pl_module)

    def _resolve_schedules(self, trainer: pl.Trainer) -> None:
        total = planned_steps(trainer)
        scheduler = find_scheduler(trainer)
        ramp_end = 1.0 if self.freeze_at is None else self.freeze_at
        if total is None and (scheduler is None or isinstance(ramp_end, float)):
            raise ValueError(
                f"Spartan(freeze_at={self.freeze_at}) needs the run's length, which is unknown here (no max_steps, "
                "and max_epochs=-1 or a dataloader without a length): its sharpness ramp ends at freeze_at (or at the "
                "run's end when it is None) and, without a SparsityScheduler, its density ramp at 20% of the run. Set "
                "max_steps, or give freeze_at as an int step and the density through a SparsityScheduler with int steps"
            )
        default_density = Schedule(self.density or 1.0, 1.0, 0, WARMUP, "linear").resolve(total)
        self._density_schedule = None if scheduler else default_density
        final = DEFAULT_SHARPNESS if self.sharpness is None else self.sharpness
        self._sharpness_schedule = Schedule(final, 1.0, 0, ramp_end, "linear").resolve(total)
        self._freeze_step = None if self.freeze_at is None else resolve_step(self.freeze_at, total)
        density_end = scheduler.window()[1] if scheduler else default_density.end
        if self._freeze_step is not None and self._freeze_step < density_end:
            fraction = f" (or a fraction >= {density_end / total:.3g} of the run)" if total else ""
            raise ValueError(f"Spartan(freeze_at={self.freeze_at}) freezes the mask at step {self._freeze_step}, "
                             f"before the density reaches its final value at step {density_end}; freeze later: "
                             f"freeze_at={density_end}{fraction}")

    # ----------------------------------------------------------------------------------------- numbers
    def target_density(self, step: int) -> float:
        if self._scheduler is None and self._density_schedule is not None:
            return self._density_schedule(step)
        return super().target_density(step)

    def sharpness_at(self, step: int) -> float:
        """:math:`\\beta` at ``step`` (scaled by the square root of the block size)."""
        scheduled = None if self._scheduler is None else self._scheduler.sharpness(step)
        beta = self._sharpness_schedule(step) if scheduled is None else scheduled
        if isinstance(self.pattern, Blocks):
            beta *= math.sqrt(self.pattern.rows * self.pattern.cols)
        return beta

    @property
    def costs(self) -> dict[str, float]:
        """Cost of each weight of every target: 1, or a conv's output spatial size under ``cost="flops"``."""
        return dict(self._costs)

    @property
    def frozen(self) -> bool:
        """Whether the mask is frozen (fine-tuning phase)."""
        return self._frozen is not None

    @property
    def schedule_end(self) -> int:
        if self._scheduler is None and self._density_schedule is not None:
            return int(self._density_schedule.end)
        return super().schedule_end

    @property
    def schedule_argument(self) -> str:
        if self._scheduler is None:
            return f"Spartan's default density ramp over the first {WARMUP:.0%} of the run"
        return super().schedule_argument

    def final_update_due(self, step: int) -> bool:
        return not self.frozen and super().final_update_due(step)

    def should_update(self, step: int) -> bool:
        if self.frozen:
            return False
        return step % self.update_every == 0 or (self._freeze_step is not None and step >= self._freeze_step)

    # ----------------------------------------------------------------------------------------- masks
    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        densities, beta = self.layer_densities(step), self.sharpness_at(step)
        names = list(self.masks.params)
        if self.distribution == "global":
            pooled = [n for n in names if n not in self.layer_overrides]
            groups = [(pooled, self.target_density(step))] if pooled else []
            groups += [([n], densities[n]) for n in names if n in self.layer_overrides]
        else:
            groups = [([n], densities[n]) for n in names]
        masks: dict[str, Tensor] = {}
        previous, self._budgets = self._budgets, {}
        for (group, _), (budget, group_masks) in zip(groups, self._solve(groups, beta, previous), strict=True):
            self._budgets.update(dict.fromkeys(group, budget))
            masks.update(group_masks)
        return masks

    def _solve(self, groups: list[tuple[list[str], float]], beta: float, previous: dict[str, Budget]) -> list:
        """Every budget's threshold and hard masks (under FSDP2 on the local rows, the selections batched)."""
        if not self.masks.sharded:
            return [solve_budget(self.masks.params, names, self.pattern, self._costs, density, beta,
                                 previous.get(names[0])) for names, density in groups]
        rows = {n: self.masks.local_param(n) for n in self.masks.params}
        shapes = {n: tuple(p.shape) for n, p in self.masks.params.items()}
        group = next(iter(self.masks.shards.values())).group
        return solve_sharded_budgets(rows, groups, shapes, self.pattern, beta, previous, group)

    def local_gradients(self, dense: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """FSDP2: the soft mask's gradient on the local rows (:func:`sharded_gradients`; autograd once frozen)."""
        if self._frozen is not None:
            return super().local_gradients(dense, grads)
        budgets = list({id(b): b for b in self._budgets.values()}.values())
        group = next(iter(self.masks.shards.values())).group
        return sharded_gradients(budgets, dense, grads, self.pattern, self._costs, group)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        changed = super().update_masks(trainer, pl_module, step)
        if self._freeze_step is not None and step >= self._freeze_step:
            self._freeze()
        return changed

    @torch.no_grad()
    def _freeze(self) -> None:
        self._frozen = {}
        for name in self.masks.params:
            budget = self._budgets[name]
            threshold = budget.threshold_tensor(self.masks.params, self.pattern, self._costs, graph=False)
            values = soft_group_values(self.masks.local_param(name), self.pattern, threshold, budget.sharpness,
                                       self._costs[name])
            keep = self.pattern.compress(self.masks.masks[name]).reshape(-1)
            self._frozen[name] = torch.where(keep, values.to(keep.device), 0.0)

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        if self._frozen is not None:
            return weight * self.pattern.expand(self._frozen[name], weight.shape).to(weight.dtype)
        budget = self._budgets[name]
        if budget.threshold == -math.inf:
            return weight
        graph = torch.is_grad_enabled() and weight.requires_grad
        threshold = budget.threshold_tensor(self.masks.params, self.pattern, self._costs, graph)
        return spartan_weight(weight, self.pattern, threshold, budget.sharpness, self.masks.multiplier(name),
                              self._costs[name])

    # ----------------------------------------------------------------------------------------- state
    def extra_state_dict(self) -> dict[str, Any]:
        budgets = list({id(b): b for b in self._budgets.values()}.values())
        frozen = None if self._frozen is None else {n: self._whole_groups(n, m) for n, m in self._frozen.items()}
        return {"budgets": [b.to_state() for b in budgets], "costs": dict(self._costs), "frozen": frozen}

    def _whole_groups(self, name: str, values: Tensor) -> Tensor:
        """The frozen values of every group of ``name`` (gathered from every shard under FSDP2), flat, on the CPU."""
        return whole_groups(values, self.masks.shards[name], self.pattern, tuple(self.masks.params[name].shape))

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self._costs.update(state["costs"])
        self._budgets = {}
        for entry in state["budgets"]:
            budget = Budget.from_state(entry)
            self._budgets.update(dict.fromkeys(budget.names, budget))
        frozen = state["frozen"]
        self._frozen = None if frozen is None else {
            n: local_groups(m, self.masks.shards[n], self.pattern, tuple(self.masks.params[n].shape))
            .to(self.masks.params[n].device) for n, m in frozen.items()
        }
