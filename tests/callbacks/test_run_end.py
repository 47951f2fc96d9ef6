"""No silent results: the masks reach the density asked whatever ``update_every`` is, a run short of its schedule says
so (at train start and at fit end, with both densities, per layer in the monitor's table), checkpoints saved after
fit resume exactly or are refused with a reason, and the progress bar shows the logger's version as it gives it."""

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse.callbacks import (
    MagnitudePruning,
    NMSparsity,
    SparsityMonitor,
    SparsityScheduler,
    Spartan,
    Supermask,
    TopKAST,
)
from lightning_sparse.callbacks.monitor import readable_metrics
from tests import harness


def _fit(callbacks, model=None, ckpt_path=None, data=None, **kwargs):
    model = model or harness.plain_model()
    trainer = pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, deterministic=True, **{"max_epochs": -1 if "max_steps" in kwargs else 1, **kwargs},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, harness.harness_data() if data is None else data, ckpt_path=ckpt_path)
    return trainer, model, [str(w.message) for w in caught]


def _densities(model, names):
    params = dict(model.named_parameters())
    return {name: params[name].count_nonzero().item() / params[name].numel() for name in names}


@pytest.mark.parametrize("cls", [TopKAST, MagnitudePruning])
def test_the_schedule_end_between_two_updates_reaches_the_final_density(cls):
    # the case: end=20 on a 40-step run, update_every=100; TopKAST used to end fully dense (1.0 everywhere)
    callback = cls(density=0.25, update_every=100)
    one_epoch = torch.utils.data.DataLoader(harness.harness_data().dataset, batch_size=1)  # 64 steps per epoch
    _, model, messages = _fit([SparsityScheduler(density=0.25, start=0, end=20), callback], data=one_epoch,
                              max_steps=40)
    assert set(_densities(model, callback.masks.params).values()) == {0.25}
    assert callback.last_update_step == 20
    assert not [m for m in messages if "asked" in m]


def test_a_run_shorter_than_its_schedule_says_so_at_start_and_end_with_both_densities():
    monitor, pruning = SparsityMonitor(), TopKAST(update_every=100)
    _, model, messages = _fit([SparsityScheduler(density=0.25, end=20), pruning, monitor], max_steps=15)
    start = [m for m in messages if "will end at density" in m]
    end = [m for m in messages if "the run ended at optimizer step 15" in m]
    assert len(start) == 1 and len(end) == 1, messages
    assert re.search(r"ends at optimizer step 20 \(SparsityScheduler\(end=20\)\), after the run's last step 15 "
                     r"\(max_steps=15\): the masks will end at density 0.2617, not the 0.25 asked", start[0])
    assert re.search(r"\(max_steps=15\), before the density schedule's end at step 20 .*: density 0.2618 reached, "
                     r"0.25 asked", end[0])
    # the run ended between two updates: the masks were updated at fit end, to the density scheduled at step 15
    assert pruning.last_update_step == 15
    table = str(monitor.last_report)
    assert table.splitlines()[0].split() == ["parameter", "shape", "nonzero", "density", "target", "asked"]
    assert re.search(r"body.0.weight\s+64x64\s+1072/4096\s+0.2617\s+0.2617\s+0.2500", table)


def test_an_early_stop_short_of_the_schedule_warns_once_at_the_end():
    _, _, messages = _fit([harness.StopAfterEpoch(0), SparsityScheduler(density=0.25, end=0.75),
                           MagnitudePruning(update_every=2)], max_epochs=2)
    assert [m for m in messages if "will end at density" in m] == []  # the planned run is long enough
    end = [m for m in messages if "asked" in m]
    assert len(end) == 1 and "ended at optimizer step 4 (stopped early: trainer.should_stop" in end[0]
    assert "before the density schedule's end at step 6 (SparsityScheduler(end=0.75)): density 0.2778 reached, " \
           "0.25 asked" in end[0]


@pytest.mark.parametrize(("callback", "argument"), [(MagnitudePruning(density=0.5, at_step=100), "at_step=100"),
                                                    (NMSparsity(n=2, m=4, at_step=100), "at_step=100")])
def test_a_one_shot_prune_after_the_run_warns(callback, argument):
    _, model, messages = _fit([callback], max_steps=3)
    assert set(_densities(model, callback.masks.params).values()) == {1.0}
    assert any(f"ends at optimizer step 100 ({argument})" in m and "end at density 1, not the 0.5 asked" in m
               for m in messages), messages
    assert any("density 1 reached, 0.5 asked" in m for m in messages), messages


class _EvalNet(harness.HarnessNet):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.training_step(batch, batch_idx))


def _eval_net():
    torch.manual_seed(0)
    return _EvalNet()


@pytest.mark.parametrize("make", [
    lambda: [SparsityScheduler(density=0.25, end=0.75), TopKAST(update_every=3)],
    lambda: [SparsityScheduler(density=0.25, end=0.75), MagnitudePruning(update_every=4)],
    lambda: [Supermask(density=0.25, tile_size=4)],
], ids=["TopKAST", "MagnitudePruning", "Supermask"])
def test_a_checkpoint_saved_after_validate_and_test_resumes_exactly(make, tmp_path):
    _, full, _ = _fit(make(), _eval_net(), max_epochs=2, limit_val_batches=0)
    trainer, stopped, _ = _fit([harness.StopAfterEpoch(0), *make()], _eval_net(), max_epochs=2, limit_val_batches=0)
    data = harness.harness_data()
    trainer.validate(stopped, data, verbose=False)
    trainer.test(stopped, data, verbose=False)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    _, resumed, _ = _fit(make(), _eval_net(), ckpt_path=str(tmp_path / "after.ckpt"), max_epochs=2,
                         limit_val_batches=0)
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_checkpoint_saved_after_bake_without_training_state_is_refused(tmp_path):
    topkast = TopKAST(density=0.25, update_every=2, bake_at_end=False)
    trainer, model, _ = _fit([topkast], max_steps=4)
    topkast.bake(keep_training_state=False)
    trainer.save_checkpoint(tmp_path / "baked.ckpt")
    harness.check_strict_checkpoint(model, tmp_path / "baked.ckpt")  # fine for inference and export
    with pytest.raises(ValueError, match=r"saved after TopKAST.bake\(keep_training_state=False\): it holds the baked "
                       r"\(masked\) weights.* Use it for inference or export .*not to resume; for a resumable "
                       r"checkpoint, save one before bake\(\)"):
        _fit([TopKAST(density=0.25, update_every=2)], ckpt_path=str(tmp_path / "baked.ckpt"), max_steps=8)


def test_bake_keeps_the_training_state_for_checkpoints_by_default(tmp_path):
    spartan = Spartan(density=0.25, sharpness=5.0, freeze_at=None, bake_at_end=False)
    trainer, model, _ = _fit([spartan], max_steps=4)
    dense = {name: p.detach().clone() for name, p in spartan.masks.params.items()}
    spartan.bake()
    trainer.save_checkpoint(tmp_path / "baked.ckpt")
    state = torch.load(tmp_path / "baked.ckpt", weights_only=True)
    kept = state["callbacks"][spartan.state_key]["resume_weights"]
    assert all(torch.equal(kept[name], dense[name]) for name in dense)
    assert not torch.equal(state["state_dict"]["head.weight"], dense["head.weight"])  # the model holds baked weights


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_the_progress_bar_shows_the_version_as_the_logger_gives_it(bar, tmp_path):
    trainer = pl.Trainer(
        max_steps=2, callbacks=[MagnitudePruning(density=0.0123), SparsityMonitor(log_every_n_steps=1), bar()],
        logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_model_summary=False, enable_checkpointing=False,
    )
    model = harness.plain_model()
    trainer.fit(model, harness.harness_data())
    shown = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert shown["v_num"] == "0"  # Rich formats numbers with .3f: it read "v_num: 0.000"
    assert re.fullmatch(r"0\.01\d{0,3}", shown["sparsity/density"]), shown  # 4 significant digits, not 0.012


def test_readable_metrics_leaves_other_values_and_text_versions_alone():
    shown = readable_metrics({"v_num": "a1b2", "sparsity/density": 0.5, "sparsity/flag": True, "loss": 2.34567})
    assert shown == {"v_num": "a1b2", "sparsity/density": "0.5", "sparsity/flag": True, "loss": 2.34567}


def test_the_cli_trainer_has_a_readable_progress_bar():
    from lightning_sparse.cli import SparseCLI

    cli = SparseCLI(
        pl.LightningModule, pl.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--model=lightning_sparse.models.MLP", "--data=lightning_sparse.data.DigitsDataModule",
              "--trainer.logger=false", "--trainer.enable_model_summary=false"],
    )
    assert type(cli.trainer.progress_bar_callback.__dict__["get_metrics"]).__name__ == "_ReadableMetrics"
