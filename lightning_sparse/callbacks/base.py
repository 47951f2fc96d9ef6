"""``SparsityCallback``: the base of every mask callback.

It owns *when* things happen; subclasses say *which* mask to keep (:meth:`compute_masks`) and, optionally,
*when* to recompute it (:meth:`should_update`). Per optimizer step, in Lightning's order:

1. ``on_before_optimizer_step`` (gradients accumulated and unscaled): :meth:`on_gradients` sees the dense
   gradients;
2. the optimizer steps on dense gradients;
3. ``on_train_batch_end``: masked-out weights are re-zeroed (one fused multiply over all targets); when
   :meth:`should_update` says so, new masks are computed, the optimizer state (momentum, Adam moments) of every
   position whose mask changed is cleared, and the weights are masked.

Every forward therefore sees exact zeros, and a weight grown back starts at zero with zeroed optimizer state.
Gradients are deliberately *not* masked: with masked gradients 90% of Adam's second moment is exactly zero, and
``sqrt`` of zeros takes a slow path on x86 CPUs (about 14x slower than on non-zeros, measured here), which made
the optimizer step about 2x slower. Gradient clipping therefore sees the dense gradient norm.

Steps are optimizer steps (``trainer.global_step``). Masks, counters and the random generator live in
:meth:`state_dict`, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks._run_end import (
    RESUME_WEIGHTS,
    planned_steps,
    restore_weights,
    run_length,
    short_run_at_end,
    short_run_at_start,
    snapshot,
    why_ended,
)
from lightning_sparse.callbacks.scheduler import SparsityScheduler, find_scheduler
from lightning_sparse.core.density import allocate_densities, check_density, check_distribution
from lightning_sparse.core.patterns import NM, parse_pattern
from lightning_sparse.core.selection import select_masks
from lightning_sparse.distributed import check_shard, select_sharded_masks
from lightning_sparse.layers import check_pattern, kind_of
from lightning_sparse.mask_checkpoint import (
    is_tensor_reference,
    load_tensors,
    reference,
    sharded_entries,
    tag_of,
    tensor_entries,
    tensor_reference,
)
from lightning_sparse.masking import MaskState
from lightning_sparse.targets import as_globs, describe_targets, select_targets


def stream_seed(seed: int) -> int:
    """The seed of a callback's own generator: ``seed`` mixed with a constant, so that it never draws the numbers
    ``torch.manual_seed(seed)`` gave the model's initialisation (``seed_everything(0)`` and a callback's default
    ``seed=0`` would otherwise make random masks keep exactly the weights drawn largest).

    >>> stream_seed(0) != 0 and stream_seed(0) == stream_seed(0)
    True
    """
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


def fsdp2_algorithms() -> list[str]:
    """The names of the library's callbacks that run under ``ModelParallelStrategy`` (FSDP2), sorted."""
    import lightning_sparse.callbacks  # noqa: F401  (every algorithm's class defined)

    found, stack = set(), [SparsityCallback]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.supports_fsdp2 and cls.__module__.startswith("lightning_sparse."):
            found.add(cls.__name__)
    return sorted(found)


def saves_sharded(strategy: object) -> bool:
    """Whether ``strategy`` writes distributed checkpoints (``ModelParallelStrategy``'s default), whose callback state
    only rank 0 writes."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy) and bool(getattr(strategy, "_save_distributed_checkpoint", True))


class SparsityCallback(Callback):
    """Base class of the mask callbacks; see the module docstring for the order of events.

    Args:
        density: fraction of weights kept, in (0, 1]; the final one when a :class:`SparsityScheduler` drives it
            (leave it ``None`` then, or give the same number).
        pattern: ``"unstructured"``, ``"RxC"`` blocks (densities count blocks) or ``"N:M"`` (density ``N/M``).
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"`` (one top-k over all targets).
        include: glob patterns of parameter names to sparsify; default: Linear, Conv and attention weights.
        exclude: glob patterns of parameter names to leave dense.
        skip_first: leave the first target dense.
        skip_last: leave the last target dense.
        update_every: optimizer steps between mask updates; an update is also forced at the density schedule's end
            step and at fit end when the masks are stale, so the run ends at the density asked.
        seed: seed of the callback's own ``torch.Generator`` (identical on every rank).

    Raises:
        ValueError: for a density outside (0, 1], an unknown pattern or distribution, ``update_every < 1``, or a
            distribution other than ``"uniform"`` or a density other than ``N/M`` with an N:M pattern.
        TypeError: for arguments of the wrong type.
    """

    hard_mask: bool = True
    """Whether masked-out weights are kept physically zero (re-zeroed after every optimizer step; the optimizer
    state of changed positions cleared when :attr:`resets_optimizer_state`). Algorithms that keep dense weights
    and mask the forward instead (Spartan, Top-KAST) set it False; their :class:`MaskState` then only records the
    current hard masks."""

    resets_optimizer_state: bool = True
    """Whether a hard-mask update zeroes the optimizer state of every weight whose mask changed."""

    supports_fsdp2: bool = False
    """Whether the algorithm runs on FSDP2-sharded parameters (Lightning's ``ModelParallelStrategy``); the others
    refuse that strategy at setup rather than train a silently dense model."""

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
    ) -> None:
        self.density = None if density is None else check_density(density)
        self.pattern = parse_pattern(pattern)
        self.distribution = check_distribution(distribution)
        self._check_nm(self.density)
        self.include = as_globs("include", include)
        self.exclude = as_globs("exclude", exclude)
        self.skip_first, self.skip_last = bool(skip_first), bool(skip_last)
        self.update_every = check_int("update_every", update_every, 1)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(stream_seed(self.seed))
        self.masks: MaskState | None = None
        self.layer_overrides: dict[str, float] = {}
        self.last_update_step = -1
        self._scheduler: SparsityScheduler | None = None
        self._seen_step = -1
        self._pending: dict[str, Any] | None = None
        self._layouts: dict[str, bool] = {}
        self._sharded_save = False  # masks go into the distributed checkpoint, rank by rank (mask_checkpoint)
        self._resume_masks: dict[str, Tensor] | None = None  # the local masks kept with _resume_state

    def _check_nm(self, density: float | None, source: str = "density={}") -> None:
        if not isinstance(self.pattern, NM):
            return
        if self.distribution != "uniform":
            raise ValueError(f"pattern {self.pattern} needs distribution='uniform', got {self.distribution!r}")
        if density is not None and abs(density - self.pattern.density) > 1e-9:
            raise ValueError(f"pattern {self.pattern} keeps density {self.pattern.density}, got "
                             f"{source.format(density)}; give {source.format(self.pattern.density)} (or leave it out)")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            density=self.density, pattern=str(self.pattern), include=self.include, exclude=self.exclude
        )

    @property
    def pattern_argument(self) -> str:
        """The pattern as the user wrote it, for messages (``pattern='2:4'``; ``tile_size=16`` for Supermask)."""
        return f"pattern={str(self.pattern)!r}"

    # ----------------------------------------------------------------------------------------- overridables
    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        """New boolean masks for every target at optimizer step ``step``."""
        raise NotImplementedError

    def should_update(self, step: int) -> bool:
        """Whether to recompute the masks after optimizer step ``step`` (``0``: at train start)."""
        return step % self.update_every == 0

    def on_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Called with the accumulated, unscaled, *unmasked* gradients before they are masked."""

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Called at train start and after every optimizer step, before a mask update."""

    def extra_state_dict(self) -> dict[str, Any]:
        """Algorithm state to checkpoint besides masks, counters and the generator."""
        return {}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` saved."""

    # ----------------------------------------------------------------------------------------- numbers
    @property
    def final_density(self) -> float:
        """The density the run ends at (the scheduler's when one drives this callback)."""
        if self._scheduler is not None:
            return self._scheduler.final_density
        if self.density is None:
            return self.pattern.density if isinstance(self.pattern, NM) else 1.0
        return self.density

    def target_density(self, step: int) -> float:
        """Overall target density at ``step``."""
        return self._scheduler.density(step) if self._scheduler is not None else self.final_density

    def layer_densities(self, step: int) -> dict[str, float]:
        """Target density of each target at ``step`` (overrides follow the same schedule)."""
        target, final = self.target_density(step), self.final_density
        fixed = {
            name: d if final >= 1.0 else 1.0 - (1.0 - d) * (1.0 - target) / (1.0 - final)
            for name, d in self.layer_overrides.items()
        }
        shapes = {name: tuple(p.shape) for name, p in self.masks.params.items()}
        return allocate_densities(shapes, target, self.distribution, fixed=fixed)

    # ----------------------------------------------------------------------------------------- the schedule's end
    _resume_state: dict[str, Any] | None = None  # what checkpoints hold once fit has ended (keep_resume_state)
    _fit_ending: bool = False  # True during the fit-end update

    @property
    def schedule_end(self) -> int:
        """The optimizer step from which the target density is final (``0`` without a ramp; known from train start).
        The masks reach :attr:`final_density` on that step, whatever ``update_every`` is."""
        return self._scheduler.window()[1] if self._scheduler is not None else 0

    @property
    def schedule_argument(self) -> str:
        """What sets :attr:`schedule_end`, as the user wrote it (for messages)."""
        if self._scheduler is None:
            return f"density={self.final_density}"
        return f"SparsityScheduler(end={self._scheduler.density_schedule.end!r})"

    def scheduled_density(self, step: int) -> float:
        """The density the masks hold after optimizer step ``step`` when every due update has run."""
        return self.target_density(step)

    def final_update_due(self, step: int) -> bool:
        """Whether the masks are stale after ``step``: computed for another scheduled density than ``step``'s.
        An update is then forced at the schedule's end step and at fit end, although :meth:`should_update` says
        no (``update_every`` not dividing the end step, or a run that ends between two updates)."""
        last = self.last_update_step
        return 0 <= last != step and abs(self.target_density(step) - self.target_density(last)) > 1e-12

    # ----------------------------------------------------------------------------------------- setup
    def _resolve_targets(self, pl_module: pl.LightningModule) -> list[str]:
        declared = pl_module.sparse_targets() if hasattr(pl_module, "sparse_targets") else None
        include = self.include
        self.layer_overrides = {}
        if declared is not None:
            if include is not None:
                raise ValueError(
                    f"{type(self).__name__}(include={include}) conflicts with "
                    f"{type(pl_module).__name__}.sparse_targets();"
                    " declare the targets in one place"
                )
            include = list(declared)
            densities = {glob: d for glob, d in declared.items() if d is not None} if isinstance(declared, dict) else {}
            targets = select_targets(pl_module, include, self.exclude, self.skip_first, self.skip_last)
            for glob, d in densities.items():
                check_density(d, f"sparse_targets()[{glob!r}]")
                self.layer_overrides.update({n: d for n in select_targets(pl_module, [glob]) if n in targets})
            return targets
        return select_targets(pl_module, include, self.exclude, self.skip_first, self.skip_last)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = getattr(trainer, "strategy", None)
        names = {cls.__name__ for cls in type(strategy).__mro__} if strategy is not None else set()
        works = ("single device, DDP (ddp, ddp_fork, ddp_spawn), and ModelParallelStrategy (FSDP2 fully_shard, "
                 f"data parallel only) for {', '.join(fsdp2_algorithms())}")
        if names & {"DeepSpeedStrategy", "FSDPStrategy"}:
            raise ValueError(f"{type(self).__name__} does not support {type(strategy).__name__} (its parameters "
                             f"are flattened or partitioned out of the callback's sight); what works: {works}")
        if "ModelParallelStrategy" in names and not self.supports_fsdp2:
            raise ValueError(f"{type(self).__name__} does not support ModelParallelStrategy (FSDP2) yet; what works: "
                             f"{works}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        scheduler = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityScheduler)), None)
        if scheduler is None and self.density is None and not isinstance(self.pattern, NM):
            raise ValueError(f"{type(self).__name__} needs density=... or a SparsityScheduler in the Trainer callbacks")
        if scheduler is not None:
            self._check_nm(scheduler.final_density, "SparsityScheduler(density={})")
            if self.density is not None and abs(self.density - scheduler.final_density) > 1e-12:
                raise ValueError(
                    f"{type(self).__name__}(density={self.density}) differs from SparsityScheduler(density="
                    f"{scheduler.final_density}); give the final density in one place"
                )
        targets = self._resolve_targets(pl_module)
        params = dict(pl_module.named_parameters())
        kinds = kind_of(pl_module, targets)
        for name in targets:
            check_pattern(self.pattern, name, kinds[name], tuple(params[name].shape), self.pattern_argument)
        self._layouts = {name: kind is not None and kind.transposed for name, kind in kinds.items()}
        self.masks = MaskState({name: params[name] for name in targets}, self.pattern, self._layouts)
        rank_zero_info(f"{type(self).__name__}: {describe_targets(pl_module, targets)}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hold the parameters the strategy trains: FSDP2's ``fully_shard`` (in ``configure_model``, after
        ``setup``) replaces every parameter by a sharded one, found again here by name."""
        live = dict(pl_module.named_parameters())
        if not all(live.get(name) is param for name, param in self.masks.params.items()):
            self._rebind(live)
        self._sharded_save = self.masks.sharded and saves_sharded(trainer.strategy)

    def _rebind(self, live: dict[str, Tensor]) -> None:
        """Hold the parameters ``live`` has under the targets' names (checking their shards)."""
        missing = [name for name in self.masks.params if name not in live]
        if missing:
            raise ValueError(f"{type(self).__name__}: the targets {missing} are gone from the model after "
                             "configure_model; select targets that exist in the model the strategy trains")
        self.masks = MaskState({name: live[name] for name in self.masks.params}, self.pattern, self._layouts)
        for name, shard in self.masks.shards.items():
            check_shard(self.masks.pattern_of(name), name, shard, self._layouts[name])

    def select(self, scores: dict[str, Tensor], densities: dict[str, float], global_density: float | None,
               fixed: set[str]) -> dict[str, Tensor]:
        """:func:`~lightning_sparse.core.selection.select_masks` over the targets' (local) scores: under FSDP2 an
        exact selection across the shards (:func:`~lightning_sparse.distributed.select_sharded_masks`)."""
        if not self.masks.sharded:
            return select_masks(scores, densities, self.masks.patterns, global_density, fixed)
        shapes = {name: tuple(p.shape) for name, p in self.masks.params.items()}
        return select_sharded_masks(scores, densities, self.masks.patterns, self.masks.shards, shapes,
                                    global_density, fixed)

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_start: Lightning restores the loops (global_step) and optimizers after on_fit_start
        self._scheduler = find_scheduler(trainer)
        self._resume_state = self._resume_masks = None  # training again: checkpoints hold the live state
        self._warn_short_run(trainer, at_end=False)
        if self._pending is not None:
            self._restore(self._pending, trainer.ckpt_path)
            self._pending = None
        step = trainer.global_step
        self._seen_step = step
        self._after_step(trainer, pl_module, step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.on_gradients(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._seen_step = step
        self._after_step(trainer, pl_module, step)

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.hard_mask:
            self.masks.apply_to_weights()
        self.on_step(trainer, pl_module, step)
        due = self.should_update(step) or (step == self.schedule_end and self.final_update_due(step))
        if step != self.last_update_step and due:
            self.update_masks(trainer, pl_module, step)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        """Compute and apply new masks now; returns the changed positions per target."""
        changed = self.masks.set_masks(self.compute_masks(trainer, pl_module, step))
        if self.hard_mask:
            if self.resets_optimizer_state and not self._fit_ending:  # training is over: a resume needs it as is
                self.masks.clear_optimizer_state(trainer.optimizers, changed)
            self.masks.apply_to_weights()
        self.last_update_step = step
        rank_zero_debug(f"{type(self).__name__}: masks updated at step {step}")
        return changed

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit end: masks that are stale (the run ended between two updates) are updated once more; a run that ended
        before the schedule's end says so, with the density reached and the one asked."""
        if self.masks is None:
            return
        if self.final_update_due(trainer.global_step):
            self.finish_update(trainer, pl_module)
        self._warn_short_run(trainer, at_end=True)

    def finish_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """A mask update when fit has ended: optimizer state is left as it is, and checkpoints saved from now on
        keep the state before it (:meth:`keep_resume_state`), so they still resume exactly."""
        self.keep_resume_state()
        self._fit_ending = True
        try:
            return self.update_masks(trainer, pl_module, trainer.global_step)
        finally:
            self._fit_ending = False

    def _warn_short_run(self, trainer: pl.Trainer, at_end: bool) -> None:
        last = trainer.global_step if at_end else planned_steps(trainer)
        end = self.schedule_end
        if last is None or last >= end or abs(self.scheduled_density(last) - self.final_density) <= 1e-12:
            return
        name, asked = type(self).__name__, self.final_density
        if at_end:
            reached = self.masks.global_density()  # every rank calls it (sharded masks count over all ranks)
            rank_zero_warn(short_run_at_end(name, end, self.schedule_argument, last, why_ended(trainer), reached,
                                            asked))
        else:
            rank_zero_warn(short_run_at_start(name, end, self.schedule_argument, last, run_length(trainer),
                                              self.scheduled_density(last), asked))

    # ----------------------------------------------------------------------------------------- after fit
    def keep_resume_state(self) -> None:
        """Keep what training needs (this callback's state and the targets' weights, as they are now) for every
        checkpoint saved from now on (:meth:`on_save_checkpoint`), before a fit-end update or a bake changes the live
        model: the checkpoint's model weights are the final ones, and a resume from it puts the kept weights back
        at train start. Called once; training again drops what it kept."""
        if self._resume_state is not None or self.masks is None:
            return
        weights = {name: self.masks.local_param(name) for name in self.masks.params}
        self._resume_state = snapshot(self.state_dict(), weights, self.masks.shards)
        if self._sharded_save:
            self._resume_masks = {name: mask.clone() for name, mask in self.masks.masks.items()}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._resume_state is not None:
            checkpoint.setdefault("callbacks", {})[self.state_key] = self._resume_state
        if self._sharded_save and self.masks is not None:  # each rank's packed rows, into the distributed checkpoint
            masks = self._resume_masks if self._resume_masks is not None else self.masks.masks
            tag = tag_of(self.state_key)
            checkpoint["state_dict"].update(sharded_entries(tag, masks, self.masks.params))
            for kind, tensors in self.sharded_state_tensors().items():
                checkpoint["state_dict"].update(tensor_entries(tag, kind, tensors, self.masks.params))

    def _restore_weights(self, weights: dict[str, Tensor] | None) -> None:
        if weights is not None:
            local = {name: self.masks.local_param(name) for name in weights}
            restore_weights(weights, local, self.masks.shards)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        sharded, masks = {}, None
        if self._sharded_save:  # references to what every rank writes into the distributed checkpoint
            tag = tag_of(self.state_key)
            masks = reference(tag, {name: tuple(p.shape) for name, p in self.masks.params.items()})
            sharded = {kind: tensor_reference(tag, kind, tensors, self.masks.params)
                       for kind, tensors in self.sharded_state_tensors().items()}
        return {
            "masks": masks if masks is not None else self.masks.state_dict(),
            "last_update_step": self.last_update_step,
            "generator": self.generator.get_state(),
            **self.extra_state_dict(),
            **sharded,
        }

    def sharded_state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """Per-weight state tensors beside the shards (``kind -> name -> this rank's rows``) that a distributed
        checkpoint stores rank by rank instead of in the callback's state (override with
        :meth:`load_sharded_state_tensors`; :meth:`extra_state_dict` leaves them out when :attr:`saves_sharded`)."""
        return {}

    def load_sharded_state_tensors(self, kind: str, tensors: dict[str, Tensor]) -> None:
        """Take back this rank's rows of the tensors :meth:`sharded_state_tensors` gave under ``kind``."""

    @property
    def saves_sharded(self) -> bool:
        """Whether checkpoints store the masks (and :meth:`sharded_state_tensors`) rank by rank (FSDP2)."""
        return self._sharded_save

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Refuse a checkpoint whose state for this class was saved under other arguments (masks would be lost)."""
        states = checkpoint.get("callbacks") or {}
        prefix = f"{type(self).__name__}{{"
        others = [key for key in states if isinstance(key, str) and key.startswith(prefix)]
        if others and self.state_key not in states:
            raise ValueError(
                f"the checkpoint holds {type(self).__name__} state saved as {others} but this callback is "
                f"{self.state_key}: its masks would be lost; resume with the same arguments"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.masks is not None:
            self.masks.check_state_dict(state_dict["masks"])
        self._pending = dict(state_dict)

    def _restore(self, state: dict[str, Any], path: str | None = None) -> None:
        state = dict(state)
        self.masks.load_state_dict(state.pop("masks"), path)
        for kind in [key for key, value in state.items() if is_tensor_reference(value)]:
            live = self.sharded_state_tensors().get(kind)
            self.load_sharded_state_tensors(kind, load_tensors(path, state.pop(kind), self.masks.params,
                                                                self.masks.shards, live))
        self._restore_weights(state.pop(RESUME_WEIGHTS, None))
        if self.hard_mask:
            self.masks.apply_to_weights()
        self.last_update_step = int(state.pop("last_update_step"))
        self.generator.set_state(state.pop("generator"))
        self.load_extra_state_dict(state)
