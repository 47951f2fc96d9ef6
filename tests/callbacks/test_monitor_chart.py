"""SparsityMonitor's per-layer density chart: logged at fit end to a logger that takes figures (TensorBoard's
``add_figure``), skipped with a one-line info when none does."""

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_sparse.callbacks import MagnitudePruning, SparsityMonitor
from lightning_sparse.callbacks import monitor as monitor_module
from tests.harness import harness_data, plain_model

pytest.importorskip("matplotlib")


class _Figures:
    def __init__(self):
        self.figures = []

    def add_figure(self, tag, figure, global_step=None, close=True):
        bars = [bar.get_width() for bar in figure.axes[0].patches]
        self.figures.append((tag, global_step, bars, [t.get_text() for t in figure.axes[0].get_yticklabels()]))


class FigureLogger(Logger):
    """A logger whose experiment takes figures, as TensorBoard's SummaryWriter does."""

    def __init__(self):
        super().__init__()
        self._experiment = _Figures()

    name, version = "figures", 0

    @property
    def experiment(self):
        return self._experiment

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(tmp_path, logger, monitor):
    trainer = pl.Trainer(max_steps=2, callbacks=[MagnitudePruning(density=0.25), monitor], logger=logger,
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(plain_model(), harness_data())
    return trainer


def test_the_chart_goes_to_a_logger_that_takes_figures(tmp_path):
    logger, monitor = FigureLogger(), SparsityMonitor()
    _fit(tmp_path, logger, monitor)
    [(tag, step, bars, names)] = logger.experiment.figures
    rows = monitor.last_report.rows
    assert (tag, step) == ("sparsity/density_chart", 2)
    assert names == [row["name"] for row in rows] and bars == pytest.approx([row["density"] for row in rows])


def _infos(monkeypatch):
    infos = []
    monkeypatch.setattr(monitor_module, "rank_zero_info", infos.append)
    return infos


def test_skipped_with_one_info_line_when_no_logger_takes_figures(tmp_path, monkeypatch):
    infos = _infos(monkeypatch)
    _fit(tmp_path, CSVLogger(tmp_path), SparsityMonitor())
    skipped = [info for info in infos if "density chart" in info]
    assert skipped == ["SparsityMonitor: density chart skipped: CSVLogger takes no figures (TensorBoard does)"]


def test_off_and_argument_check(tmp_path, monkeypatch):
    logger, infos = FigureLogger(), _infos(monkeypatch)
    _fit(tmp_path, logger, SparsityMonitor(density_chart=False))
    assert logger.experiment.figures == [] and not [info for info in infos if "density chart" in info]
    with pytest.raises(TypeError, match="density_chart must be True or False, got 'yes'"):
        SparsityMonitor(density_chart="yes")
