"""TopKAST: exact forward budget every step, gradients only on the backward set, export, argument errors."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse.callbacks import SparsityScheduler, TopKAST
from tests import harness


def _fit(callbacks, **kwargs):
    model = harness.plain_model()
    trainer = pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, **{"max_epochs": 2, **kwargs},
    )
    trainer.fit(model, harness.harness_data())
    return model


class GradientProbe(pl.Callback):
    """Per step and target: forward count, backward count, and gradient non-zeros inside and outside each set."""

    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        topkast = harness.sparsity_callback(trainer.callbacks)
        densities = topkast.layer_densities(topkast.last_update_step)
        for name, param in topkast.masks.params.items():
            forward = topkast.masks.masks[name]
            backward = topkast.backward_masks.get(name, torch.ones_like(forward))
            grad = param.grad != 0
            expected = harness.expected_kept(topkast, name, densities[name])
            self.rows.append({
                "forward": (int(forward.sum()), expected), "backward": int(backward.sum()), "numel": forward.numel(),
                "subset": bool((forward <= backward).all()), "outside_backward": int((grad & ~backward).sum()),
                "between": int((grad & backward & ~forward).sum()),
            })


def test_only_the_backward_set_gets_gradients():
    probe = GradientProbe()
    _fit([SparsityScheduler(density=0.25, end=0.5), TopKAST(backward_density=0.5, update_every=2), probe])
    assert len(probe.rows) == 4 * 8
    for row in probe.rows:
        kept, expected = row["forward"]
        assert kept == expected and row["subset"]
        assert row["backward"] == max(kept, round(0.5 * row["numel"]))
        assert row["outside_backward"] == 0
    assert all(row["between"] > 0 for row in probe.rows[-4:])  # weights outside the forward set still learn


def test_without_backward_density_the_gradient_is_dense():
    probe = GradientProbe()
    _fit([TopKAST(density=0.25, update_every=2), probe], max_epochs=1)
    assert all(row["backward"] == row["numel"] and row["forward"][0] == row["forward"][1] for row in probe.rows)
    assert all(row["between"] > 0 for row in probe.rows)


def test_bake_exports_the_trained_forward():
    topkast = TopKAST(density=0.25, backward_density=0.5, update_every=3, bake_at_end=False)
    model = _fit([topkast])
    x = next(iter(harness.harness_data()))[0]
    model.eval()
    with torch.no_grad():
        trained = model(x)
    assert any((p[~topkast.masks.masks[n]] != 0).any() for n, p in topkast.masks.params.items())  # dense until baked
    topkast.bake()
    plain = harness.plain_model()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), trained)
    assert all(not (p[~topkast.masks.masks[n]] != 0).any() for n, p in topkast.masks.params.items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.3, "backward_density": 0.2}, "backward_density must be >= the density 0.3, got 0.2"),
        ({"density": 0.3, "backward_density": 0.0}, r"backward_density must be in \(0, 1\]"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.1}, r"density must be in \(0, 1\]"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKAST(**kwargs)


def test_backward_density_below_the_scheduled_density_is_rejected():
    with pytest.raises(ValueError, match="backward_density must be >= the density 0.5, got 0.25"):
        _fit([SparsityScheduler(density=0.5), TopKAST(backward_density=0.25)])
