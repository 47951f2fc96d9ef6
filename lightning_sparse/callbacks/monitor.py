"""``SparsityMonitor``: logs actual and target density per layer through ``LightningModule.log``.

It also makes the progress bar readable (:func:`readable_progress_bar`): Lightning's default bar (``RichProgressBar``
when ``rich`` is installed) formats every number with ``.3f``, so the logger's version reads ``v_num: 0.000`` and a
density of 0.0123 reads 0.012. The bar then shows the version as the logger gives it and ``sparsity/*`` values with
4 significant digits.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.plots import density_figure, pyplot
from lightning_sparse.report import SparsityReport, sparsity_report
from lightning_sparse.targets import default_targets


def readable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Progress-bar items with ``v_num`` as the logger gives it and ``sparsity/*`` numbers to 4 significant digits,
    both as text (which the bars show as is).

    Example::

        >>> readable_metrics({"v_num": 0, "sparsity/density": 0.012345, "loss": 0.5})
        {'v_num': '0', 'sparsity/density': '0.01235', 'loss': 0.5}
    """
    shown = dict(metrics)
    if "v_num" in shown and not isinstance(shown["v_num"], str):
        shown["v_num"] = str(shown["v_num"])
    for key, value in shown.items():
        if key.startswith("sparsity/") and isinstance(value, int | float) and not isinstance(value, bool):
            shown[key] = f"{value:.4g}"
    return shown


class _ReadableMetrics:
    """``get_metrics`` of a progress bar, passed through :func:`readable_metrics` (picklable, unlike a closure)."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar

    def __call__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return readable_metrics(type(self.bar).get_metrics(self.bar, trainer, pl_module))


def readable_progress_bar(trainer: pl.Trainer) -> None:
    """Make ``trainer``'s progress bar show :func:`readable_metrics` (once; no bar, nothing to do)."""
    bar = trainer.progress_bar_callback
    if bar is not None and not isinstance(bar.__dict__.get("get_metrics"), _ReadableMetrics):
        bar.get_metrics = _ReadableMetrics(bar)


class SparsityMonitor(Callback):
    """Log the global and per-layer density to any logger; print a per-layer table when fit ends.

    Logs ``sparsity/density`` (global, in the progress bar) and, per target, ``sparsity/density/<name>`` and
    ``sparsity/target/<name>``.

    Works with any logger (CSVLogger, TensorBoardLogger, ...). Targets come from the trainer's sparsity
    callbacks, or the default targets when there is none.

    Args:
        log_every_n_steps: optimizer steps between logs; default: the Trainer's ``log_every_n_steps``.
        per_layer: also log each layer (global density only when False).
        density_chart: at fit end, also log a per-layer density bar chart (``sparsity/density_chart``) to every
            logger that takes figures (TensorBoard's ``add_figure``; needs matplotlib); skipped with a one-line
            info when none does.

    Raises:
        ValueError: when ``log_every_n_steps < 1``.
        TypeError: when ``density_chart`` is not a bool.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import MagnitudePruning, SparsityMonitor

        trainer = Trainer(callbacks=[MagnitudePruning(density=0.2), SparsityMonitor()])
    """

    def __init__(
        self, log_every_n_steps: int | None = None, per_layer: bool = True, density_chart: bool = True
    ) -> None:
        self.log_every_n_steps = None if log_every_n_steps is None else check_int("log_every_n_steps",
                                                                                   log_every_n_steps, 1)
        self.per_layer = per_layer
        if not isinstance(density_chart, bool):
            raise TypeError(f"density_chart must be True or False, got {density_chart!r}")
        self.density_chart = density_chart
        self.last_report: SparsityReport | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        readable_progress_bar(trainer)

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SparsityReport:
        """The current per-layer report (targets from the sparsity callbacks).

        For callbacks that keep dense weights and mask the forward (Spartan, Top-KAST, Supermask), the density is
        that of the mask the forward uses, not of the dense weights. When the run is short of a callback's schedule
        end, its rows also hold the final density ``"asked"``.
        """
        names, targets, asked, forward_masks = [], {}, {}, {}
        step = trainer.global_step
        for callback in trainer.callbacks:
            if isinstance(callback, SparsityCallback) and callback.masks is not None:
                names += [n for n in callback.masks.params if n not in names]
                targets.update(callback.layer_densities(step))
                if step < callback.schedule_end:
                    asked.update(callback.layer_densities(callback.schedule_end))
                if not callback.hard_mask:
                    forward_masks.update(callback.masks.masks)
        report = sparsity_report(pl_module, names or default_targets(pl_module), targets)
        for row in report.rows:
            if row["name"] in forward_masks:
                row["nonzero"] = int(forward_masks[row["name"]].sum())
                row["density"] = row["nonzero"] / row["numel"]
            if row["name"] in asked:
                row["asked"] = asked[row["name"]]
        return report

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every:
            return
        report = self.report(trainer, pl_module)
        pl_module.log("sparsity/density", report.global_density, prog_bar=True, on_step=True, on_epoch=False)
        if self.per_layer:
            for row in report.rows:
                pl_module.log(f"sparsity/density/{row['name']}", row["density"], on_step=True, on_epoch=False)
                if row["target"] is not None:
                    pl_module.log(f"sparsity/target/{row['name']}", row["target"], on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_report = self.report(trainer, pl_module)
        rank_zero_info(f"Sparsity at the end of fit (step {trainer.global_step}):\n{self.last_report}")
        if self.density_chart and trainer.is_global_zero:
            log_density_chart(trainer, self.last_report)


def log_density_chart(trainer: pl.Trainer, report: SparsityReport) -> list[Any]:
    """Logs ``report`` as a per-layer bar chart to the trainer's loggers that take figures (an ``experiment`` with
    ``add_figure``, as TensorBoard's); returns those loggers. A one-line info says why nothing was logged."""
    takers = [logger for logger in trainer.loggers if callable(getattr(logger.experiment, "add_figure", None))]
    if not takers:
        names = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "no logger"
        rank_zero_info(f"SparsityMonitor: density chart skipped: {names} takes no figures (TensorBoard does)")
        return []
    try:
        figure = density_figure(report.rows, title=f"density per layer at step {trainer.global_step}")
    except ImportError as err:
        rank_zero_info(f"SparsityMonitor: density chart skipped: {err}")
        return []
    for logger in takers:
        logger.experiment.add_figure("sparsity/density_chart", figure, global_step=trainer.global_step, close=False)
    pyplot().close(figure)
    return takers
