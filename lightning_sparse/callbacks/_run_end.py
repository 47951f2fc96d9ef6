"""What a mask callback says and keeps when a run ends: the run-length warnings and the state a checkpoint saved after
fit needs to resume (see :meth:`~lightning_sparse.callbacks.base.SparsityCallback.keep_resume_state`)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_sparse.distributed import Shard, gather_rows

RESUME_WEIGHTS = "resume_weights"
"""Key, in a callback's checkpoint state, of the targets' training weights kept when fit ended (before the fit-end
update or the bake changed the live model)."""


def planned_steps(trainer: pl.Trainer) -> int | None:
    """The run's last optimizer step as planned (``max_steps``, or ``max_epochs`` times the steps per epoch); None
    when it is unknown: an endless run, or epochs of a dataloader without a length (Lightning then says -1)."""
    total = trainer.estimated_stepping_batches
    return None if total is None or not math.isfinite(total) or total < 0 else int(total)


def run_length(trainer: pl.Trainer) -> str:
    """What sets the run's length, as the user wrote it: ``max_steps=40`` or ``max_epochs=2 of 4 optimizer steps``."""
    total = planned_steps(trainer)
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.max_steps == total:
        return f"max_steps={trainer.max_steps}"
    batches, accumulate = trainer.num_training_batches, max(1, trainer.accumulate_grad_batches)
    per_epoch = f" of {math.ceil(batches / accumulate)} optimizer steps" if math.isfinite(batches) else ""
    return f"max_epochs={trainer.max_epochs}{per_epoch}"


def short_run_at_start(name: str, end: int, argument: str, last: int, length: str, reached: float,
                       asked: float) -> str:
    """The warning at train start when the run is planned to end before the density schedule does."""
    return (f"{name}: the density schedule ends at optimizer step {end} ({argument}), after the run's last step "
            f"{last} ({length}): the masks will end at density {reached:.4g}, not the {asked:.4g} asked. Lengthen "
            "the run, or end the schedule earlier (a float step is a fraction of the run)")


def short_run_at_end(name: str, end: int, argument: str, last: int, why: str, reached: float, asked: float) -> str:
    """The warning at fit end when the run ended before the density schedule did."""
    return (f"{name}: the run ended at optimizer step {last} ({why}), before the density schedule's end at step {end} "
            f"({argument}): density {reached:.4g} reached, {asked:.4g} asked (SparsityMonitor's table lists each "
            "layer)")


def why_ended(trainer: pl.Trainer) -> str:
    """Why the run ended where it did: an early stop, or its planned length."""
    planned = planned_steps(trainer)
    if trainer.should_stop or (planned is not None and trainer.global_step < planned):
        return "stopped early: trainer.should_stop, e.g. by EarlyStopping"
    return run_length(trainer)


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value


def snapshot(state: dict[str, Any], weights: dict[str, Tensor], shards: dict[str, Shard | None]) -> dict[str, Any]:
    """A copy of a callback's ``state`` plus the targets' whole weights (gathered from every shard), on the CPU."""
    kept = tree_map(_clone, state)
    kept[RESUME_WEIGHTS] = {
        name: (w if shards.get(name) is None else gather_rows(w, shards[name])).detach().to("cpu", copy=True)
        for name, w in weights.items()
    }
    return kept


@torch.no_grad()
def restore_weights(weights: dict[str, Tensor], local: dict[str, Tensor], shards: dict[str, Shard | None]) -> None:
    """Write the kept whole ``weights`` into each target's ``local`` tensor (this rank's rows of a shard)."""
    for name, whole in weights.items():
        shard = shards.get(name)
        rows = whole if shard is None else whole[shard.row_offset : shard.row_offset + shard.rows]
        local[name].copy_(rows.to(device=local[name].device, dtype=local[name].dtype))
