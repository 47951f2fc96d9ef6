r"""``DynamicSparseTraining``: sparse from the first step; every ``update_every`` steps drop some weights, grow others.

An algorithm is a choice of drop criterion x grow criterion (Fantastic Weights, Nowak et al. 2023,
https://arxiv.org/abs/2306.12230); the presets SET, RigL, SNFS and MEST are in
:mod:`lightning_sparse.callbacks.dst_presets`. Per update, in every layer with :math:`a` active weights,

.. math::

    n = \mathrm{round}(f_t \cdot a), \qquad
    f_t = \frac{f_0}{2}\left(1 + \cos\frac{\pi t}{T_{stop}}\right) \quad (t < T_{stop}),

the :math:`n` active weights of lowest drop score are deactivated and the :math:`n` inactive positions (the
just-dropped ones included) of highest grow score are activated, so the layer's active count never changes
(SNFS redistribution moves counts between layers and keeps the total). :math:`T_{stop}` is ``stop_at`` times
the run's optimizer steps; a :class:`SparsityScheduler` with a ``drop_fraction`` schedule replaces :math:`f_t`.

Drop scores (lowest dropped): ``magnitude`` :math:`|w|`; ``set`` magnitude on each sign separately (SET);
``mest`` :math:`|w| + \gamma |g|`; ``snip`` :math:`|w g|`; ``reciprocal_sensitivity`` :math:`|w| / (|g| + 10^{-8})`;
``random``. Grow scores (highest grown): ``random`` (exact count), ``gradient`` :math:`|g|`, ``momentum``
:math:`|m|`. :math:`g` is the dense gradient of the update step's batch (accumulated, unscaled). :math:`m` is an
exponential average (decay 0.9) of the dense gradients that this callback keeps, so the criterion does not
depend on the optimizer (plain SGD has no momentum; a regrown weight's optimizer state is zeroed). Memory:
gradient criteria copy the targets' gradients on update steps only; ``momentum`` (growth or redistribution)
keeps one dense float32 copy of the targets and updates it every step.

Under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) every update equals the one a single process
computes from the whole weights, gradients, momentum and generator: masks, gradients and momentum stay beside each
rank's rows; drops and grows are exact selections across the shards
(:mod:`lightning_sparse.distributed_dst`: a few 256-bin histograms per layer, whatever its size); random scores are
every rank's rows of the whole layer's draws. Custom criteria are refused there (they would see sharded tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_sparse.callbacks._args import check_choice, check_float, check_int
from lightning_sparse.callbacks._run_end import planned_steps
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.core import scores
from lightning_sparse.core.criteria import (
    DROP_CRITERIA,
    GRADIENT_CRITERIA,
    GROW_CRITERIA,
    CriterionFn,
    ScoreInputs,
    builtin_scores,
    check_criterion,
    check_scores,
    criterion_name,
    drop_by_sign,
    redistribute,
    registered_criterion,
)
from lightning_sparse.core.masks import all_finite, count_true, flat_nonzero, grow_around, keep_highest_among
from lightning_sparse.core.patterns import NM, parse_pattern
from lightning_sparse.core.sparse_init import scale_to_active_fan_in_
from lightning_sparse.distributed import gather_rows, local
from lightning_sparse.distributed_dst import (
    all_finite_everywhere,
    momentum_means,
    own_rows,
    reduce,
    sharded_drop_by_sign,
    sharded_grow_around,
    sharded_keep_highest,
)

MOMENTUM_DECAY = 0.9
INITS = ("random", "magnitude")
REDISTRIBUTIONS = (None, "momentum")
OPTIMIZER_STATES = ("zero", "keep")


class DynamicSparseTraining(SparsityCallback):
    """Dynamic sparse training with any drop criterion x grow criterion (see the module docstring).

    At train start the masks are drawn at the allocated densities (``init``) and the weights are masked. Every
    ``update_every`` optimizer steps ``t`` with ``0 < t < stop_at * total_steps`` the masks are rewired after the
    optimizer step, using that step's dense gradient. Newly grown weights start at zero with zeroed optimizer
    state (``optimizer_state="keep"`` leaves the state as the optimizer kept it); a weight dropped and regrown in
    the same update keeps its value and state. A step with non-finite gradients skips its update with a warning.
    ``update_every=None`` or ``drop_fraction=0`` trains a static sparse baseline. A :class:`SparsityScheduler` may
    give the density (its final one: DST is sparse from the start) and a ``drop_fraction`` schedule.

    Args:
        drop: drop criterion: ``"magnitude"``, ``"set"``, ``"mest"``, ``"snip"``, ``"reciprocal_sensitivity"``,
            ``"random"``, a name added with :func:`~lightning_sparse.core.criteria.register_criterion`, or a
            callable ``(param, grad, optimizer_state) -> scores`` (lowest dropped).
        grow: grow criterion: ``"random"``, ``"gradient"``, ``"momentum"``, a registered name or a callable
            (highest grown).
        density: fraction of weights kept, in (0, 1] (or from a :class:`SparsityScheduler`).
        pattern: ``"unstructured"`` or ``"RxC"`` blocks (scores are averaged per block; counts are blocks).
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"`` (for the initial masks).
        include: glob patterns of parameter names to sparsify (default: Linear, Conv, attention weights).
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between mask updates; ``None`` for static sparse training.
        drop_fraction: initial fraction :math:`f_0` of each layer's active weights rewired, in [0, 1).
        stop_at: fraction of the run's optimizer steps after which the masks stay fixed, in (0, 1].
        init: initial masks: ``"random"`` (exact counts, from the seeded generator) or ``"magnitude"``.
        gamma: :math:`\\gamma` of the ``mest`` score, >= 0.
        redistribution: ``None`` or ``"momentum"`` (SNFS: see :func:`~lightning_sparse.core.criteria.redistribute`).
        seed: seed of the callback's generator (random masks, random scores), identical on every rank.
        scale_init: when the first masks are drawn, multiply each unit's initial weights by
            ``sqrt(fan_in / active fan_in)`` so sparse layers start with the dense init's output variance
            (:func:`~lightning_sparse.core.sparse_init.scale_to_active_fan_in_`; Evci et al. 2022). Not on resume.

    Raises:
        ValueError: for an unknown criterion, ``drop_fraction`` outside [0, 1), ``update_every < 1``, ``stop_at``
            outside (0, 1], an N:M pattern, an unknown ``init``/``redistribution``, ``gamma < 0``; at setup for a
            custom (callable or registered) criterion under ``ModelParallelStrategy``; during fit for a criterion
            returning scores of the wrong shape, or a gradient criterion with no gradient.
        TypeError: for arguments of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import DynamicSparseTraining

        dst = DynamicSparseTraining(drop="set", grow="gradient", density=0.1, update_every=100)
        trainer = Trainer(max_epochs=4, callbacks=[dst])
    """

    supports_fsdp2 = True

    def __init__(
        self,
        drop: str | CriterionFn = "magnitude",
        grow: str | CriterionFn = "gradient",
        density: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "erk",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int | None = 100,
        drop_fraction: float = 0.3,
        stop_at: float = 0.75,
        init: str = "random",
        gamma: float = 1.0,
        redistribution: str | None = None,
        seed: int = 0,
        scale_init: bool = False,
        optimizer_state: str = "zero",
    ) -> None:
        if isinstance(parse_pattern(pattern), NM):
            raise ValueError(f"pattern must be 'unstructured' or 'RxC' blocks for dynamic sparse training, got "
                             f"{pattern!r} (N:M masks cannot be rewired weight by weight)")
        every = 1 if update_every is None else check_int("update_every", update_every, 1)
        super().__init__(density, pattern, distribution, include, exclude, skip_first, skip_last, every, seed)
        self.update_every = update_every
        self.drop = check_criterion("drop", drop, DROP_CRITERIA)
        self.grow = check_criterion("grow", grow, GROW_CRITERIA)
        self.drop_fraction = check_float("drop_fraction", drop_fraction, 0.0, 1.0, "[)")
        self.stop_at = check_float("stop_at", stop_at, 0.0, 1.0, "(]")
        self.init = check_choice("init", init, INITS)
        self.gamma = check_float("gamma", gamma, 0.0, math.inf, "[)")
        self.redistribution = check_choice("redistribution", redistribution, REDISTRIBUTIONS)
        if not isinstance(scale_init, bool):
            raise TypeError(f"scale_init must be a bool, got {type(scale_init).__name__}: {scale_init!r}")
        self.scale_init = scale_init
        self.optimizer_state = check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATES)
        self.momentum: dict[str, Tensor] | None = None
        self._grads: dict[str, Tensor] | None = None
        self._due_step: int | None = None
        self._stop_step = math.inf

    # ----------------------------------------------------------------------------------------- numbers
    @property
    def resets_optimizer_state(self) -> bool:
        """Whether an update zeroes the optimizer state of changed positions (``optimizer_state="zero"``)."""
        return self.optimizer_state == "zero"

    @property
    def _tracks_momentum(self) -> bool:
        return self.grow == "momentum" or self.redistribution == "momentum"

    @property
    def _needs_grads(self) -> bool:
        return any(not isinstance(c, str) or c in GRADIENT_CRITERIA or registered_criterion(c) is not None
                   for c in (self.drop, self.grow))

    def target_density(self, step: int) -> float:
        """The final density at every step: DST is sparse from the start (a scheduler's ramp is not used)."""
        return self.final_density

    @property
    def schedule_end(self) -> int:
        """``0``: sparse at the final density from the first step."""
        return 0

    def layer_densities(self, step: int) -> dict[str, float]:
        """The initial allocation; with redistribution, each layer's actual density (counts move between layers)."""
        if self.redistribution is None or self.last_update_step < 0:
            return super().layer_densities(step)
        return {name: self.masks.density(name) for name in self.masks.masks}

    def drop_fraction_at(self, step: int) -> float:
        """The scheduler's drop fraction at ``step`` when it has one, else the cosine decay of ``drop_fraction``.

        Raises:
            ValueError: when the scheduler's value is outside [0, 1).
        """
        scheduled = None if self._scheduler is None else self._scheduler.drop_fraction(step)
        if scheduled is not None:
            return check_float(f"SparsityScheduler drop_fraction at step {step}", scheduled, 0.0, 1.0, "[)")
        progress = min(step / self._stop_step, 1.0)
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * progress))

    @property
    def _group(self) -> object:
        """The process group of the targets' FSDP2 shards; ``None`` when they are not sharded (no collectives)."""
        return next((shard.group for shard in self.masks.shards.values() if shard is not None), None)

    def _update_due(self, step: int) -> bool:
        return (self.update_every is not None and step % self.update_every == 0 and 0 < step < self._stop_step
                and self.drop_fraction_at(step) > 0)

    # ----------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Besides the base checks: under FSDP2 (``ModelParallelStrategy``) only the built-in criteria work.

        Raises:
            ValueError: under FSDP2 for a callable or registered criterion, naming it and the built-in ones.
        """
        super().setup(trainer, pl_module, stage)
        strategy = getattr(trainer, "strategy", None)
        if stage != "fit" or "ModelParallelStrategy" not in {cls.__name__ for cls in type(strategy).__mro__}:
            return
        for argument, criterion, builtins in (("drop", self.drop, DROP_CRITERIA), ("grow", self.grow, GROW_CRITERIA)):
            if not (isinstance(criterion, str) and criterion in builtins):
                raise ValueError(
                    f"{type(self).__name__}({argument}={criterion_name(criterion)!r}) is not supported under "
                    f"ModelParallelStrategy (FSDP2): a custom criterion is called with whole parameters and "
                    f"gradients, which are sharded there; what works: {argument} in {list(builtins)}"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = planned_steps(trainer)
        if total is None:
            raise ValueError(f"{type(self).__name__}(stop_at={self.stop_at}) needs the run's length (stop_at is a "
                             "fraction of it), which is unknown here (no max_steps, and max_epochs=-1 or a dataloader "
                             "without a length): set max_steps")
        self._stop_step = self.stop_at * total
        super().on_train_start(trainer, pl_module)
        ramp = None if self._scheduler is None else self._scheduler.density_schedule
        if ramp is not None and ramp.initial is not None and ramp.initial != ramp.final:
            rank_zero_warn(f"{type(self).__name__} is sparse from the first step at density {ramp.final}; the "
                           f"SparsityScheduler's density ramp from {ramp.initial} is not used")

    def on_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step + 1  # the optimizer step about to happen
        due = self._update_due(step)
        if not (due or self._tracks_momentum):
            return
        grads = {name: local(p.grad) for name, p in self.masks.params.items() if p.grad is not None}
        group = self._group  # FSDP2: every rank must agree, so the check covers all shards
        tensors = list(grads.values())
        finite = all_finite(tensors) if group is None else all_finite_everywhere(tensors, group)
        if finite and self._tracks_momentum:
            self._track_momentum(grads)
        if due and not finite:
            rank_zero_warn(f"{type(self).__name__}: non-finite gradients at optimizer step {step}; the mask update "
                           "of this step is skipped")
        elif due:
            self._capture(grads, step)

    def _track_momentum(self, grads: dict[str, Tensor]) -> None:
        if self.momentum is None:
            self.momentum = {name: torch.zeros_like(self.masks.local_param(name), dtype=torch.float32)
                             for name in self.masks.params}
        names = list(grads)
        torch._foreach_lerp_([self.momentum[n] for n in names], [grads[n].float() for n in names], 1 - MOMENTUM_DECAY)

    def _capture(self, grads: dict[str, Tensor], step: int) -> None:
        missing = [name for name in self.masks.params if name not in grads]
        builtin = [c for c in (self.drop, self.grow) if isinstance(c, str) and c in GRADIENT_CRITERIA]
        if missing and builtin:
            raise ValueError(
                f"criterion {builtin[0]!r} needs the gradient of every target, but {missing} have no gradient "
                f"(param.grad is None) at optimizer step {step}: they took no part in the loss; exclude them or "
                f"use a criterion without gradient ('magnitude', 'set', 'random')"
            )
        if self._needs_grads:
            self._grads = {name: g.detach().clone() for name, g in grads.items()}
        self._due_step = step

    def should_update(self, step: int) -> bool:
        """At train start until masks exist; afterwards on the steps whose gradients :meth:`on_gradients` kept."""
        return self.last_update_step < 0 or self._due_step == step

    # ----------------------------------------------------------------------------------------- masks
    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        if self.last_update_step < 0:
            return self._initial_masks(step)
        try:
            return self._rewire(trainer.optimizers, self.drop_fraction_at(step))
        finally:
            self._grads, self._due_step = None, None

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        initial = self.last_update_step < 0
        changed = super().update_masks(trainer, pl_module, step)
        if initial and self.scale_init:
            for name in self.masks.params:
                scale_to_active_fan_in_(self.masks.local_param(name), self.masks.masks[name])
        return changed

    def _initial_masks(self, step: int) -> dict[str, Tensor]:
        if self.init == "random":
            init_scores = {name: self._random_scores(name) for name in self.masks.params}
        else:
            init_scores = {name: scores.magnitude(self.masks.local_param(name)) for name in self.masks.params}
        global_density = self.final_density if self.distribution == "global" else None
        return self.select(init_scores, self.layer_densities(step), global_density, set(self.layer_overrides))

    def _rewire(self, optimizers: list, fraction: float) -> dict[str, Tensor]:
        groups = {name: self.masks.pattern_of(name).compress(mask) for name, mask in self.masks.masks.items()}
        active = self._active_groups(groups)
        drops = {name: round(fraction * active[name]) for name in groups}
        grows = self._redistribute(active, drops) if self.redistribution else drops
        fresh = isinstance(self.grow, str) and self.grow in GROW_CRITERIA  # built-in scores are new tensors
        group, masks = self._group, {}
        for name, group_mask in groups.items():
            kept = self._kept_after_drop(name, group_mask, drops[name], active[name], optimizers)
            grow_scores = self.masks.pattern_of(name).group_scores(self._scores(self.grow, name, optimizers))
            if group is None:
                grown = grow_around(grow_scores, kept, grows[name], overwrite=fresh)
            else:
                grown = sharded_grow_around(grow_scores, kept, grows[name], group)
            masks[name] = self.masks.pattern_of(name).expand(grown.reshape(group_mask.shape),
                                                             tuple(self.masks.masks[name].shape))
        return masks

    def _active_groups(self, groups: dict[str, Tensor]) -> dict[str, int]:
        """Active groups of each layer (over all shards: one collective of one number per layer)."""
        counts = reduce(torch.tensor([count_true(g) for g in groups.values()], dtype=torch.int64), self._group)
        return dict(zip(groups, counts.tolist(), strict=True))

    def _kept_after_drop(self, name: str, group_mask: Tensor, n: int, active: int, optimizers: list) -> Tensor:
        """Flat (local) indices of the groups still active after dropping ``n`` of the layer's ``active``."""
        pattern, group = self.masks.pattern_of(name), self._group
        group_scores = pattern.group_scores(self._scores(self.drop, name, optimizers)).to(group_mask.device)
        if self.drop == "set":
            kept = drop_by_sign(group_scores, group_mask, n) if group is None else sharded_drop_by_sign(
                group_scores, group_mask, n, group)
            return flat_nonzero(kept)
        if group is not None:
            return sharded_keep_highest(group_scores, group_mask, active - n, group)
        candidates = flat_nonzero(group_mask)
        return keep_highest_among(group_scores, candidates, candidates.numel() - n)

    def _redistribute(self, active: dict[str, int], drops: dict[str, int]) -> dict[str, int]:
        values = {name: self.momentum[name].abs()[mask] for name, mask in self.masks.masks.items()}
        sizes = {name: p.numel() for name, p in self.masks.params.items()}
        weights = momentum_means(values, sizes, self._group)
        shapes = {name: tuple(p.shape) for name, p in self.masks.params.items()}
        capacities = {name: self.masks.pattern_of(name).num_groups(shapes[name]) - active[name] + drops[name]
                      for name in active}
        return redistribute(drops, capacities, weights)

    def _scores(self, criterion: str | CriterionFn, name: str, optimizers: list) -> Tensor:
        param, grad = self.masks.params[name], (self._grads or {}).get(name)
        custom = criterion if callable(criterion) else registered_criterion(criterion)
        if custom is not None:  # refused under FSDP2 (setup)
            state = next((opt.state[param] for opt in optimizers if param in opt.state), {})
            return check_scores(criterion_name(criterion), custom(param, grad, state), param)
        if criterion == "random":
            return self._random_scores(name)
        momentum = None if self.momentum is None else self.momentum[name]
        return builtin_scores(criterion, ScoreInputs(self.masks.local_param(name), grad, momentum, self.generator,
                                                     self.gamma))

    def _random_scores(self, name: str) -> Tensor:
        """Random scores of target ``name`` from the generator; under FSDP2 this rank's rows of the whole layer's
        draws (every rank draws them all, keeping its rows: the generator stays identical on every rank)."""
        param, shard = self.masks.params[name], self.masks.shards[name]
        if shard is None:
            return scores.random(param, self.generator)
        start, device = shard.row_offset, self.masks.masks[name].device
        return scores.random_rows(tuple(param.shape), self.generator, start, start + shard.rows, device)

    # ----------------------------------------------------------------------------------------- state
    def extra_state_dict(self) -> dict[str, Any]:
        if self.momentum is None or self.saves_sharded:  # sharded: rank by rank (sharded_state_tensors)
            return {}
        shards = self.masks.shards  # FSDP2: whole tensors (every rank calls state_dict), as in one process
        return {"momentum": {name: (m if shards[name] is None else gather_rows(m, shards[name])).detach().cpu().clone()
                             for name, m in self.momentum.items()}}

    def sharded_state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {} if self.momentum is None else {"momentum": self.momentum}

    def load_sharded_state_tensors(self, kind: str, tensors: dict[str, Tensor]) -> None:
        self.momentum = {name: t.to(self.masks.masks[name].device) for name, t in tensors.items()}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state.get("momentum")
        if momentum is not None:
            self.momentum = {name: own_rows(m, self.masks.shards[name]).to(self.masks.masks[name].device)
                             for name, m in momentum.items()}
