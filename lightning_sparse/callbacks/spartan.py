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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sparse.callbacks.masked import MaskedForwardCallback
from lightning_sparse.callbacks.scheduler import SparsityScheduler, find_scheduler
from lightning_sparse.core.masks import topk_threshold
from lightning_sparse.core.patterns import NM, Blocks
from lightning_sparse.core.schedules import Schedule, resolve_step
from lightning_sparse.core.soft_mask import (
    group_magnitudes,
    hard_topk,
    soft_group_values,
    soft_topk_threshold,
    spartan_weight,
    threshold_node,
)

COSTS = ("params", "flops")
DEFAULT_SHARPNESS = 20.0
WARMUP = 0.2  # the reference's density ramp: 1 -> density over the first 20% of the run
HINT_MARGIN = 0.02  # the hard top-k selects among the entries within (1 -+ this) x the previous k-th value


@dataclass
class _Budget:
    """One soft top-k budget: a layer, or every pooled layer under ``distribution="global"``."""

    names: tuple[str, ...]
    threshold: float
    sharpness: float
    value: Tensor | None = field(default=None, repr=False)  # the threshold as a float32 tensor on the weights' device
    node: Tensor | None = field(default=None, repr=False)  # the shared threshold node (graph; never pickled)
    kth: float | None = None  # the hard top-k's last kept value: a hint for the next selection (not state)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "node": None}

    def to_state(self) -> dict[str, Any]:
        return {"names": list(self.names), "threshold": self.threshold, "sharpness": self.sharpness}


def _check_positive(argument: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be a float > 0, got {type(value).__name__}: {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{argument} must be a finite number > 0, got {value}")
    return float(value)


def _check_step(argument: str, value: int | float | None) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be an int step, a float fraction of the run or None, got {value!r}")
    if (isinstance(value, float) and not 0.0 <= value <= 1.0) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{argument} must be an int step >= 0 or a float fraction in [0, 1], got {value}")
    return value


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
            distribution, a bad ``freeze_at``; in ``setup``, a scheduler sharpness that is not > 0 or given twice.
        TypeError: for arguments of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import Spartan

        trainer = Trainer(max_epochs=10, callbacks=[Spartan(density=0.1, sharpness=20.0, distribution="global")])
    """

    def __init__(
        self,
        density: float | None = None,
        sharpness: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "uniform",
        cost: str = "params",
        freeze_at: int | float | None = 0.8,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
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
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        self.sharpness = _check_positive("sharpness", sharpness)
        self.cost = cost
        self.freeze_at = _check_step("freeze_at", freeze_at)
        self._budgets: dict[str, _Budget] = {}
        self._frozen: dict[str, Tensor] | None = None
        self._costs: dict[str, float] = {}
        self._cost_hooks: list = []
        self._density_schedule: Schedule | None = None
        self._sharpness_schedule: Schedule | None = None
        self._freeze_step: int | None = None

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
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
        total = trainer.estimated_stepping_batches
        total = None if total is None or math.isinf(total) else int(total)
        scheduler = find_scheduler(trainer)
        default_density = Schedule(self.density or 1.0, 1.0, 0, WARMUP, "linear").resolve(total)
        self._density_schedule = None if scheduler else default_density
        final = DEFAULT_SHARPNESS if self.sharpness is None else self.sharpness
        ramp_end = 1.0 if self.freeze_at is None else self.freeze_at
        self._sharpness_schedule = Schedule(final, 1.0, 0, ramp_end, "linear").resolve(total)
        self._freeze_step = None if self.freeze_at is None else resolve_step(self.freeze_at, total)
        density_end = scheduler.window()[1] if scheduler else default_density.end
        if self._freeze_step is not None and self._freeze_step < density_end:
            raise ValueError(f"Spartan(freeze_at={self.freeze_at}) freezes the mask at step {self._freeze_step}, "
                             f"before the density reaches its final value at step {density_end}; freeze later")

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
        for group, density in groups:
            masks.update(self._solve(group, density, beta, previous.get(group[0])))
        return masks

    @torch.no_grad()
    def _solve(self, names: list[str], density: float, beta: float, previous: _Budget | None) -> dict[str, Tensor]:
        """Soft threshold and exact hard top-k of one budget; the previous step's threshold starts the solve."""
        params = self.masks.params
        scores = [group_magnitudes(params[n], self.pattern) for n in names]
        device = scores[0].device
        flat = torch.cat([s.to(device) for s in scores])
        costs = None
        if any(self._costs[n] != 1.0 for n in names):
            costs = torch.cat([torch.full_like(s, self._costs[n], device=device)
                               for n, s in zip(names, scores, strict=True)])
        guess = None if previous is None or not math.isfinite(previous.threshold) else previous.threshold
        threshold = soft_topk_threshold(flat, density, beta, costs, guess)
        hard, kth = self._hard_topk(flat, density, costs, previous)
        budget = _Budget(tuple(names), threshold, beta, kth=kth)
        self._budgets.update(dict.fromkeys(names, budget))
        chunks = torch.split(hard, [s.numel() for s in scores])
        return {n: self.pattern.expand(c, params[n].shape) for n, c in zip(names, chunks, strict=True)}

    @staticmethod
    def _hard_topk(
        flat: Tensor, density: float, costs: Tensor | None, previous: _Budget | None
    ) -> tuple[Tensor, float | None]:
        """The exact hard top-k; it selects within a band around the previous step's k-th value when there is one."""
        if density == 1:
            return torch.ones_like(flat, dtype=torch.bool), None
        if costs is not None:
            return hard_topk(flat, density, costs), None
        bracket = None
        if previous is not None and previous.kth is not None:
            margin = HINT_MARGIN * abs(previous.kth)
            bracket = (previous.kth - margin, previous.kth + margin)
        return topk_threshold(flat, round(density * flat.numel()), bracket)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        changed = super().update_masks(trainer, pl_module, step)
        if self._freeze_step is not None and step >= self._freeze_step:
            self._freeze()
        return changed

    @torch.no_grad()
    def _freeze(self) -> None:
        self._frozen = {}
        for name, param in self.masks.params.items():
            budget = self._budgets[name]
            threshold = self._threshold(budget, graph=False)
            values = soft_group_values(param, self.pattern, threshold, budget.sharpness, self._costs[name])
            keep = self.pattern.compress(self.masks.masks[name]).reshape(-1)
            self._frozen[name] = torch.where(keep, values.to(keep.device), 0.0)

    def _threshold(self, budget: _Budget, graph: bool) -> Tensor:
        """The budget's threshold: the shared node when a graph is being built, else a constant tensor."""
        params = [self.masks.params[n] for n in budget.names]
        if budget.value is None:
            budget.value = torch.tensor(budget.threshold, dtype=torch.float32, device=params[0].device)
        if not graph:
            return budget.value
        if budget.node is None:
            costs = [self._costs[n] for n in budget.names]
            budget.node = threshold_node(params, self.pattern, budget.threshold, budget.sharpness, costs)
        return budget.node

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        if self._frozen is not None:
            return weight * self.pattern.expand(self._frozen[name], weight.shape).to(weight.dtype)
        budget = self._budgets[name]
        if budget.threshold == -math.inf:
            return weight
        threshold = self._threshold(budget, torch.is_grad_enabled() and weight.requires_grad)
        return spartan_weight(weight, self.pattern, threshold, budget.sharpness, self.masks.multiplier(name),
                              self._costs[name])

    # ----------------------------------------------------------------------------------------- state
    def extra_state_dict(self) -> dict[str, Any]:
        budgets = list({id(b): b for b in self._budgets.values()}.values())
        frozen = None if self._frozen is None else {n: m.cpu().clone() for n, m in self._frozen.items()}
        return {"budgets": [b.to_state() for b in budgets], "costs": dict(self._costs), "frozen": frozen}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self._costs.update(state["costs"])
        self._budgets = {}
        for entry in state["budgets"]:
            budget = _Budget(tuple(entry["names"]), float(entry["threshold"]), float(entry["sharpness"]))
            self._budgets.update(dict.fromkeys(budget.names, budget))
        frozen = state["frozen"]
        self._frozen = None if frozen is None else {
            n: m.to(self.masks.params[n].device) for n, m in frozen.items()
        }
