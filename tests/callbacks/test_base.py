"""SparsityCallback mechanics: argument checks, grad masking, optimizer-state clearing, overrides, resume errors."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse import SparseModuleMixin
from lightning_sparse.callbacks import MagnitudePruning, SparsityMonitor, SparsityScheduler
from tests import harness


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **{"max_epochs": 1, **kwargs},
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0.0}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 1.2}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 0.5, "pattern": "5x"}, ValueError, "pattern must be"),
        ({"density": 0.5, "distribution": "normal"}, ValueError, "distribution must be one of"),
        ({"density": 0.5, "update_every": 0}, ValueError, "update_every must be >= 1"),
        ({"density": 0.5, "update_every": 1.5}, TypeError, "update_every must be an int"),
        ({"density": 0.5, "seed": -1}, ValueError, "seed must be >= 0"),
        ({"density": 0.3, "pattern": "2:4"}, ValueError, "keeps density 0.5, got density=0.3; give density=0.5"),
        ({"pattern": "2:4", "distribution": "erk"}, ValueError, "needs distribution='uniform'"),
        ({"density": 0.5, "include": 3}, TypeError, "include must be a glob string or a list of glob strings, got 3"),
        ({"density": 0.5, "at_step": -2}, ValueError, "at_step must be >= 0"),
        ({"density": 0.5, "rewind_to": -1}, ValueError, "rewind_to must be >= 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MagnitudePruning(**kwargs)


def test_setup_errors_name_the_problem():
    data = harness.harness_data()
    with pytest.raises(ValueError, match="needs density=... or a SparsityScheduler"):
        _trainer([MagnitudePruning()]).fit(harness.plain_model(), data)
    with pytest.raises(ValueError, match=r"differs from SparsityScheduler\(density=0.1\)"):
        _trainer([SparsityScheduler(0.1), MagnitudePruning(density=0.2)]).fit(harness.plain_model(), data)
    with pytest.raises(ValueError, match=r"keeps density 0.5, got SparsityScheduler\(density=0.1\); give "
                                         r"SparsityScheduler\(density=0.5\)"):
        _trainer([SparsityScheduler(0.1), MagnitudePruning(pattern="2:4")]).fit(harness.plain_model(), data)
    with pytest.raises(ValueError, match=r"pattern=.3x3. \(3x3 blocks of the \(out, in\) view\) "
                       r"does not tile conv.weight: a Conv1d weight stored as \(8, 4, 2\), \(out, in\) view 8x8"):
        _trainer([MagnitudePruning(density=0.5, pattern="3x3")]).fit(harness.plain_model(), data)
    with pytest.raises(ValueError, match="include glob 'encoder.*' matches no parameter"):
        _trainer([MagnitudePruning(density=0.5, include=["encoder.*"])]).fit(harness.plain_model(), data)
    with pytest.raises(ValueError, match="one SparsityScheduler"):
        _trainer([SparsityScheduler(0.1), SparsityScheduler(0.1), MagnitudePruning()]).fit(harness.plain_model(), data)


def test_resume_with_mismatched_masks_is_rejected(tmp_path):
    harness.fit(harness.AlgorithmCase("a", lambda: [MagnitudePruning(density=0.5)]), tmp_path)
    ckpt = str(tmp_path / "epoch=0.ckpt")
    with pytest.raises(ValueError, match="the checkpoint's masks do not match the model"):
        _trainer([MagnitudePruning(density=0.5, skip_last=True)], max_epochs=2).fit(
            harness.plain_model(), harness.harness_data(), ckpt_path=ckpt
        )
    with pytest.raises(ValueError, match="its masks would be lost; resume with the same arguments"):
        _trainer([MagnitudePruning(density=0.5, exclude=["head.weight"])], max_epochs=2).fit(
            harness.plain_model(), harness.harness_data(), ckpt_path=ckpt
        )


class _Probe(pl.Callback):
    """Records, after each optimizer step and after the sparsity callback ran, the head's weight and Adam state."""

    def __init__(self):
        self.weights, self.states = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        state = trainer.optimizers[0].state[pl_module.head.weight]
        self.weights.append(pl_module.head.weight.detach().clone())
        self.states.append({k: v.clone() for k, v in state.items() if k != "step"})


def test_weights_zero_after_every_step_and_state_cleared_where_the_mask_changed():
    probe = _Probe()
    pruning = MagnitudePruning(density=0.25, at_step=2)
    _trainer([pruning, probe], max_steps=4).fit(harness.plain_model(), harness.harness_data())
    mask = pruning.masks.masks["head.weight"]
    assert (probe.weights[0] != 0).all()  # dense before pruning
    for weight in probe.weights[1:]:  # steps 2, 3, 4: pruned at 2, kept zero after every later step
        assert not weight[~mask].any()
    # at step 2 the dropped positions' Adam moments were zeroed; the moments of kept positions were not
    assert probe.states[0]["exp_avg"][~mask].abs().sum() > 0
    assert not probe.states[1]["exp_avg"][~mask].any() and not probe.states[1]["exp_avg_sq"][~mask].any()
    assert probe.states[1]["exp_avg"][mask].abs().sum() > 0


def test_gradients_stay_dense_for_the_optimizer():
    grads = []

    class GradProbe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.head.weight.grad.clone())

    pruning = MagnitudePruning(density=0.25)
    _trainer([pruning, GradProbe()], max_steps=2).fit(harness.plain_model(), harness.harness_data())
    assert grads[-1][~pruning.masks.masks["head.weight"]].abs().sum() > 0


def test_gradient_accumulation_counts_optimizer_steps():
    pruning = MagnitudePruning(update_every=1)
    trainer = _trainer([SparsityScheduler(0.5, start=0, end=2, shape="linear"), pruning], accumulate_grad_batches=2)
    trainer.fit(harness.plain_model(), harness.harness_data())
    assert trainer.global_step == 2 and pruning.last_update_step == 2
    assert pruning.masks.global_density() == pytest.approx(0.5, abs=1e-3)


class OverrideNet(SparseModuleMixin, harness.HarnessNet):
    def sparse_targets(self):
        return {"body.*.weight": None, "head.weight": 0.5}


def test_module_sparse_targets_and_report():
    torch.manual_seed(0)
    model, pruning, monitor = OverrideNet(), MagnitudePruning(density=0.25), SparsityMonitor(per_layer=True)
    _trainer([pruning, monitor], max_steps=2).fit(model, harness.harness_data())
    assert list(pruning.masks.params) == ["body.0.weight", "body.2.weight", "head.weight"]
    assert pruning.masks.density("head.weight") == 0.5 and pruning.masks.density("body.0.weight") == 0.25
    rows = {row["name"]: row for row in model.sparsity_report().rows}
    assert rows["head.weight"]["target"] == 0.5 and rows["body.0.weight"]["density"] == 0.25
    assert "head.weight" in str(monitor.last_report)
    with pytest.raises(ValueError, match="conflicts with OverrideNet.sparse_targets"):
        _trainer([MagnitudePruning(density=0.5, include=["head.weight"])]).fit(OverrideNet(), harness.harness_data())


class BadOverrideNet(SparseModuleMixin, harness.HarnessNet):
    def sparse_targets(self):
        return {"head.weight": 2.0}


def test_module_override_density_is_checked():
    with pytest.raises(ValueError, match=r"sparse_targets\(\)\['head.weight'\] must be in \(0, 1\]"):
        _trainer([MagnitudePruning(density=0.5)]).fit(BadOverrideNet(), harness.harness_data())


def test_monitor_logs_through_lightning(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    monitor = SparsityMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[SparsityScheduler(0.3, end=2, shape="linear"), MagnitudePruning(update_every=1),
                                 monitor],
        logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(harness.plain_model(), harness.harness_data())
    logged = next(tmp_path.rglob("metrics.csv")).read_text()
    for key in ("sparsity/density", "sparsity/density/head.weight", "sparsity/target/head.weight",
                "sparsity/scheduled_density"):
        assert key in logged
    assert monitor.last_report.global_density == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(ValueError, match="log_every_n_steps must be >= 1"):
        SparsityMonitor(log_every_n_steps=0)


def test_scheduler_argument_errors_and_unresolved_use():
    with pytest.raises(ValueError, match=r"initial_density must be in \(0, 1\]"):
        SparsityScheduler(0.1, initial_density=0.0)
    with pytest.raises(ValueError, match="start must not be after end"):
        SparsityScheduler(0.1, start=100, end=10)
    with pytest.raises(RuntimeError, match="not resolved yet"):
        SparsityScheduler(0.1).density(0)
    with pytest.raises(RuntimeError, match="not resolved yet"):
        SparsityScheduler(0.1).window()


def test_rewind_resets_kept_weights_to_their_early_values():
    torch.manual_seed(0)
    model = harness.HarnessNet()
    initial = model.head.weight.detach().clone()
    pruning = MagnitudePruning(density=0.5, at_step=3, rewind_to=0)
    _trainer([pruning], max_steps=3).fit(model, harness.harness_data())
    mask = pruning.masks.masks["head.weight"]
    assert torch.equal(model.head.weight.detach(), initial * mask)


class _DriftingSGD(torch.optim.SGD):
    """Moves every weight, zero or not: a stand-in for optimizers that do not keep zeros."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


class _DriftNet(harness.HarnessNet):
    def configure_optimizers(self):
        return _DriftingSGD(self.parameters(), lr=0.01)


def test_weights_stay_masked_whatever_the_optimizer_does():
    torch.manual_seed(0)
    model, pruning = _DriftNet(), MagnitudePruning(density=0.25)
    _trainer([pruning], max_steps=3).fit(model, harness.harness_data())
    assert not pruning.masks.names_with_weights_outside_mask()
    assert pruning.masks.density("head.weight") == 0.25


def test_monitor_reports_the_forward_mask_of_dense_weight_algorithms():
    from lightning_sparse.callbacks import TopKAST

    monitor, topkast = SparsityMonitor(), TopKAST(density=0.25, update_every=1, bake_at_end=False)
    model = harness.plain_model()
    _trainer([topkast, monitor], max_steps=2).fit(model, harness.harness_data())
    assert model.head.weight.count_nonzero() == model.head.weight.numel()  # weights stay dense (not baked)
    rows = {row["name"]: row for row in monitor.last_report.rows}
    assert rows["head.weight"]["density"] == pytest.approx(0.25)
    assert monitor.last_report.global_density == pytest.approx(0.25, abs=1e-3)


def test_a_callbacks_generator_never_replays_the_global_seeds_numbers():
    # seed_everything(0) and the default seed=0 drew the same numbers: random masks kept the weights drawn largest
    first = torch.rand(1000, generator=MagnitudePruning(density=0.5, seed=0).generator)
    assert not torch.equal(first, torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    again = torch.rand(1000, generator=MagnitudePruning(density=0.5, seed=0).generator)
    assert torch.equal(first, again)  # still a pure function of seed
