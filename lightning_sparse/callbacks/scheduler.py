r"""``SparsityScheduler``: the one place where time-varying numbers (density, sharpness, drop fraction) live.

Mask callbacks read their numbers from the scheduler at every optimizer step; the scheduler never touches
masks. Without a scheduler a mask callback uses its own constant ``density``. Whatever a callback's ``update_every``,
its masks reach the final density on the ``end`` step (an update is forced there); a run that ends before ``end``
warns at train start and at fit end, with the density reached and the one asked.

Density follows (default ``shape="cubic"``, Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878):

.. math::

    d_t = d_f + (d_i - d_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^3, \qquad t_0 \le t \le t_1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_sparse.callbacks._run_end import planned_steps
from lightning_sparse.core.density import check_density
from lightning_sparse.core.schedules import Schedule, build_schedule


class SparsityScheduler(Callback):
    """Drives target density (and optionally sharpness and drop fraction) over optimizer steps.

    Args:
        density: final fraction of weights kept, in (0, 1].
        initial_density: fraction kept at ``start``.
        start: first step of the ramp: an optimizer step (``int``) or a fraction of the run (``float``).
        end: last step of the ramp, same units as ``start``.
        shape: ``"constant"``, ``"linear"``, ``"cubic"``, ``"cosine"`` or ``"exponential"``.
        sharpness: soft-mask sharpness schedule for Spartan-like algorithms: a number or a
            ``{"type": ..., "initial": ..., "final": ..., "start": ..., "end": ...}`` dict; ``None`` for none.
        drop_fraction: drop-fraction schedule for dynamic sparse training, same forms as ``sharpness``.

    Raises:
        ValueError: for a density outside (0, 1], an unknown shape, or ``start`` after ``end``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import MagnitudePruning, SparsityScheduler

        trainer = Trainer(max_epochs=5, callbacks=[
            SparsityScheduler(density=0.1, start=0.0, end=0.75, shape="cubic"),
            MagnitudePruning(update_every=50),
        ])
    """

    def __init__(
        self,
        density: float = 0.1,
        initial_density: float = 1.0,
        start: int | float = 0,
        end: int | float = 0.75,
        shape: str = "cubic",
        sharpness: float | Mapping[str, Any] | None = None,
        drop_fraction: float | Mapping[str, Any] | None = None,
    ) -> None:
        check_density(density)
        check_density(initial_density, "initial_density")
        self.density_schedule = Schedule(final=density, initial=initial_density, start=start, end=end, shape=shape)
        self.sharpness_schedule = None if sharpness is None else build_schedule(sharpness)
        self.drop_fraction_schedule = None if drop_fraction is None else build_schedule(drop_fraction)
        self._resolved: dict[str, Schedule | None] | None = None

    @property
    def final_density(self) -> float:
        """The density reached at ``end``."""
        return self.density_schedule.final

    def resolve(self, trainer: pl.Trainer) -> None:
        """Turn fractional ``start``/``end`` into optimizer steps using the run's total steps."""
        total = planned_steps(trainer)
        schedules = {
            "density": self.density_schedule,
            "sharpness": self.sharpness_schedule,
            "drop_fraction": self.drop_fraction_schedule,
        }
        owners = {"density": "SparsityScheduler", "sharpness": "SparsityScheduler sharpness",
                  "drop_fraction": "SparsityScheduler drop_fraction"}
        self._resolved = {key: None if s is None else s.resolve(total, owners[key]) for key, s in schedules.items()}

    def _value(self, key: str, step: int) -> float | None:
        if self._resolved is None:
            raise RuntimeError("SparsityScheduler is not resolved yet: it resolves at train start")
        schedule = self._resolved[key]
        return None if schedule is None else schedule(step)

    def density(self, step: int) -> float:
        """Target density at optimizer step ``step``."""
        return self._value("density", step)

    def sharpness(self, step: int) -> float | None:
        """Sharpness at ``step``, or None when no sharpness schedule was given."""
        return self._value("sharpness", step)

    def drop_fraction(self, step: int) -> float | None:
        """Drop fraction at ``step``, or None when no drop-fraction schedule was given."""
        return self._value("drop_fraction", step)

    def window(self) -> tuple[int, int]:
        """The density ramp's ``(start, end)`` in optimizer steps."""
        if self._resolved is None:
            raise RuntimeError("SparsityScheduler is not resolved yet: it resolves at train start")
        schedule = self._resolved["density"]
        return int(schedule.start), int(schedule.end)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % trainer.log_every_n_steps:
            return
        values = {"density": self.density(step), "sharpness": self.sharpness(step),
                  "drop_fraction": self.drop_fraction(step)}
        for key, value in values.items():
            if value is not None:
                pl_module.log(f"sparsity/scheduled_{key}", value, on_step=True, on_epoch=False)


def find_scheduler(trainer: pl.Trainer) -> SparsityScheduler | None:
    """The trainer's ``SparsityScheduler``, or None.

    Raises:
        ValueError: when the trainer has more than one.
    """
    found = [cb for cb in trainer.callbacks if isinstance(cb, SparsityScheduler)]
    if len(found) > 1:
        raise ValueError(f"a Trainer may hold one SparsityScheduler, got {len(found)}")
    if found and found[0]._resolved is None:
        found[0].resolve(trainer)
    return found[0] if found else None
