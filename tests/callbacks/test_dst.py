"""DynamicSparseTraining behaviour: what is dropped and grown, optimizer state, counts, skipped steps, errors."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sparse.callbacks import SNFS, DynamicSparseTraining, RigL, SparsityScheduler
from tests import harness

UPDATE = 2  # the update step of the single-update runs (update_every=2, max_steps=3)


def _fit(callbacks, model=None, **kwargs):
    trainer = pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **{"max_steps": UPDATE + 1, **kwargs},
    )
    trainer.fit(model or harness.plain_model(), harness.harness_data())
    return trainer


def _constant_fraction(fraction=0.3):
    return SparsityScheduler(density=0.1, initial_density=0.1, drop_fraction=fraction)


def _adam_state(trainer, params):
    optimizer = trainer.optimizers[0]
    return {n: {k: v.clone() for k, v in optimizer.state[p].items() if k != "step"} for n, p in params.items()}


class _Before(pl.Callback):
    """Placed before the DST callback: the dense gradient and old masks of the update step; the weights and Adam
    state after its optimizer step (before the update)."""

    def __init__(self, dst):
        self.dst, self.grads, self.masks, self.weights, self.states = dst, {}, {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == UPDATE:
            self.grads = {n: p.grad.clone() for n, p in self.dst.masks.params.items()}
            self.masks = {n: m.clone() for n, m in self.dst.masks.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == UPDATE:
            self.weights = {n: p.detach().clone() for n, p in self.dst.masks.params.items()}
            self.states = _adam_state(trainer, self.dst.masks.params)


class _After(pl.Callback):
    """Placed after the DST callback: masks, weights, Adam state and DST momentum right after the update."""

    def __init__(self, dst):
        self.dst, self.masks, self.weights, self.states, self.momentum = dst, {}, {}, {}, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step != UPDATE:
            return
        self.masks = {n: m.clone() for n, m in self.dst.masks.masks.items()}
        self.weights = {n: p.detach().clone() for n, p in self.dst.masks.params.items()}
        self.states = _adam_state(trainer, self.dst.masks.params)
        if self.dst.momentum is not None:
            self.momentum = {n: m.clone() for n, m in self.dst.momentum.items()}


def _probed_fit(dst, *extra, **kwargs):
    before, after = _Before(dst), _After(dst)
    _fit([*extra, before, dst, after], **kwargs)
    return before, after


def _expected_rigl(old, weight, grad, n):
    """Drop the n smallest |w| among active, then grow the n largest |g| among the rest (just-dropped included)."""
    old, weight, grad = old.flatten(), weight.flatten(), grad.flatten()
    active = old.nonzero().squeeze(1)
    dropped = active[torch.argsort(weight[active].abs(), stable=True)[:n]]
    kept = old.clone()
    kept[dropped] = False
    grown = torch.argsort(grad.abs().masked_fill(kept, -math.inf), descending=True, stable=True)[:n]
    kept[grown] = True
    return kept


def test_rigl_grows_top_gradients_and_zeroes_dropped_moments():
    dst = RigL(density=0.1, update_every=UPDATE, stop_at=1.0)
    before, after = _probed_fit(dst, _constant_fraction(0.3))
    assert dst.last_update_step == UPDATE
    for name, old in before.masks.items():
        new, n = after.masks[name], round(0.3 * int(old.sum()))
        assert torch.equal(new.flatten(), _expected_rigl(old, before.weights[name], before.grads[name], n)), name
        grown, dropped = new & ~old, old & ~new
        assert grown.any() and dropped.any(), name
        assert before.grads[name].abs()[grown].min() >= before.grads[name].abs()[~new].max()
        assert not after.weights[name][grown].any() and not after.weights[name][dropped].any()
        for moment in ("exp_avg", "exp_avg_sq"):
            assert not after.states[name][moment][dropped].any() and not after.states[name][moment][grown].any()
            assert after.states[name][moment][old & new].abs().sum() > 0


def test_rigl_keep_optimizer_state_leaves_regrown_and_dropped_moments_as_the_optimizer_left_them():
    dst = RigL(density=0.1, update_every=UPDATE, stop_at=1.0, optimizer_state="keep")
    before, after = _probed_fit(dst, _constant_fraction(0.3))
    assert dst.last_update_step == UPDATE
    for name, old in before.masks.items():
        new = after.masks[name]
        grown, dropped = new & ~old, old & ~new
        assert grown.any() and dropped.any(), name
        assert not after.weights[name][grown].any() and not after.weights[name][dropped].any()  # weights: zero
        for moment in ("exp_avg", "exp_avg_sq"):  # state: untouched by the update, non-zero (dense gradients)
            assert torch.equal(after.states[name][moment], before.states[name][moment]), (name, moment)
            assert after.states[name][moment][grown].abs().min() > 0


def _away_from_dropped(param, grad, optimizer_state):
    """Grow score that ranks just-dropped (non-zero) weights below every never-active (zero) position."""
    return -param.detach().abs()


class _FewNegativeConvWeights(Callback):
    """Before the masks are drawn: all but 3 of conv.weight's weights positive, so its drop runs short of negatives."""

    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            weight = pl_module.get_parameter("conv.weight").view(-1)
            weight.abs_()
            weight[:3] *= -1


def test_set_drops_the_right_counts_per_sign():
    dst = DynamicSparseTraining(drop="set", grow=_away_from_dropped, density=0.1, update_every=UPDATE, stop_at=1.0)
    before, after = _probed_fit(dst, _constant_fraction(0.3), _FewNegativeConvWeights())
    shortages = 0
    for name, old in before.masks.items():
        weight, new = before.weights[name], after.masks[name]
        positive, negative = old & (weight >= 0), old & (weight < 0)
        n = round(0.3 * int(old.sum()))
        n_negative = min(n // 2, int(negative.sum()))  # a short sign gives all it has, the other the rest
        shortages += n_negative < n // 2
        dropped, kept = old & ~new, old & new
        assert int((dropped & positive).sum()) == n - n_negative and int((dropped & negative).sum()) == n_negative
        assert weight[dropped & positive].max() <= weight[kept & positive].min()  # smallest positive dropped
        if (kept & negative).any():
            assert weight[dropped & negative].min() >= weight[kept & negative].max()  # negatives closest to zero
    assert shortages == 1  # conv.weight has fewer active negative weights than n // 2


def _regrow_dropped(param, grad, optimizer_state):
    """Grow score that picks exactly the just-dropped weights (the only inactive non-zero ones)."""
    return param.detach().abs()


def test_dropped_and_regrown_weight_keeps_value_and_state():
    dst = DynamicSparseTraining(grow=_regrow_dropped, density=0.1, update_every=UPDATE, stop_at=1.0)
    before, after = _probed_fit(dst, _constant_fraction(0.3))
    assert dst.last_update_step == UPDATE
    for name, old in before.masks.items():
        assert torch.equal(after.masks[name], old)
        # active positions (the dropped-and-regrown ones among them) keep value and state; inactive ones, which
        # the optimizer moved with the dense gradient, are re-zeroed
        assert torch.equal(after.weights[name][old], before.weights[name][old])
        assert not after.weights[name][~old].any()
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after.states[name][moment][old], before.states[name][moment][old])
            assert before.states[name][moment][old].abs().sum() > 0


class _PoisonGradient(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == UPDATE:
            pl_module.head.weight.grad[0, 0] = math.inf


def test_non_finite_gradients_skip_the_update_with_a_warning():
    dst = RigL(density=0.1, update_every=UPDATE, stop_at=1.0)
    before = _Before(dst)
    with pytest.warns(UserWarning, match=f"non-finite gradients at optimizer step {UPDATE}; the mask update"):
        _fit([_PoisonGradient(), before, dst])
    assert dst.last_update_step == 0
    for name, mask in before.masks.items():
        assert torch.equal(dst.masks.masks[name], mask)


class _Counts(pl.Callback):
    def __init__(self, dst):
        self.dst, self.counts = dst, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.counts.append({n: int(m.sum()) for n, m in self.dst.masks.masks.items()})


@pytest.mark.parametrize(
    "dst",
    [RigL(density=0.1, update_every=2, stop_at=1.0),
     DynamicSparseTraining(drop="set", grow="random", pattern="4x4", distribution="uniform", density=0.25,
                           update_every=2, stop_at=1.0)],
    ids=["rigl", "set-random-4x4"],
)
def test_active_counts_never_change(dst):
    counts = _Counts(dst)
    _fit([dst, counts], max_steps=8)
    assert dst.last_update_step == 6
    assert all(c == counts.counts[0] for c in counts.counts)


def test_snfs_grows_top_momentum_and_keeps_the_total():
    dst = SNFS(density=0.1, update_every=UPDATE)
    before, after = _probed_fit(dst, _constant_fraction(0.5))
    total_before = sum(int(m.sum()) for m in before.masks.values())
    assert sum(int(m.sum()) for m in after.masks.values()) == total_before
    assert any(int(after.masks[n].sum()) != int(m.sum()) for n, m in before.masks.items())
    for name, old in before.masks.items():
        new, momentum = after.masks[name], after.momentum[name].abs()
        grown = new & ~old
        if grown.any() and (~new).any():
            assert momentum[grown].min() >= momentum[~new].max(), name


def test_snfs_counts_move_between_layers_and_total_stays():
    dst = SNFS(density=0.1, update_every=2)
    counts = _Counts(dst)
    _fit([dst, counts], max_steps=8)
    totals = {sum(c.values()) for c in counts.counts}
    assert len(totals) == 1 and any(c != counts.counts[0] for c in counts.counts)
    assert dst.layer_densities(8) == {n: dst.masks.density(n) for n in dst.masks.masks}


@pytest.mark.parametrize("kwargs", [{"update_every": None}, {"drop_fraction": 0.0}], ids=["no-updates", "zero"])
def test_static_sparse_baseline(kwargs):
    dst = DynamicSparseTraining(density=0.1, **kwargs)
    before = _Before(dst)
    _fit([before, dst], max_steps=8)
    assert dst.last_update_step == 0
    for name, mask in before.masks.items():
        assert torch.equal(dst.masks.masks[name], mask)


def test_cosine_drop_fraction_and_stop():
    dst = RigL(density=0.1, update_every=2, stop_at=0.75, drop_fraction=0.4)
    _fit([dst], max_steps=8)
    assert dst.last_update_step == 4  # step 6 is not before 0.75 * 8
    assert dst.drop_fraction_at(0) == pytest.approx(0.4) and dst.drop_fraction_at(3) == pytest.approx(0.2)
    assert dst.drop_fraction_at(6) == pytest.approx(0.0)


def test_initial_random_masks_are_exact_and_seeded():
    masks = []
    for _ in range(2):
        dst = DynamicSparseTraining(density=0.1, update_every=None, seed=3)
        _fit([dst], max_steps=1)
        masks.append(dst.masks.masks)
        densities = dst.layer_densities(0)
        for name, mask in dst.masks.masks.items():
            assert int(mask.sum()) == round(densities[name] * mask.numel())
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.parametrize("scale_init", [False, True])
def test_scale_init_scales_each_unit_to_its_active_fan_in(scale_init):
    torch.manual_seed(0)
    dst = DynamicSparseTraining(density=0.25, update_every=None, scale_init=scale_init)
    initial = {}

    class Snapshot(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            initial.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

        def on_train_start(self, trainer, pl_module):  # runs after the DST callback drew and applied the masks
            for name, param in dst.masks.params.items():
                mask = dst.masks.masks[name]
                rows = mask.reshape(mask.shape[0], -1)
                scale = (rows.shape[1] / rows.sum(1).clamp_min(1)).sqrt() if scale_init else torch.ones(len(rows))
                expected = initial[name] * mask * scale.view(-1, *([1] * (param.dim() - 1)))
                torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=0)

    _fit([dst, Snapshot()], max_steps=1)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"drop": "bogus"}, ValueError, r"drop must be one of \['magnitude', 'set', 'mest', .*got 'bogus'"),
        ({"grow": "magnitude"}, ValueError, r"grow must be one of \['random', 'gradient', 'momentum'.*'magnitude'"),
        ({"drop": 3}, TypeError, "drop must be a criterion name or a callable, got int: 3"),
        ({"drop_fraction": 1.0}, ValueError, r"drop_fraction must be in \[0.0, 1.0\), got 1.0"),
        ({"drop_fraction": -0.1}, ValueError, r"drop_fraction must be in \[0.0, 1.0\), got -0.1"),
        ({"drop_fraction": "0.3"}, TypeError, "drop_fraction must be a float, got str: '0.3'"),
        ({"stop_at": True}, TypeError, "stop_at must be a float, got bool: True"),
        ({"update_every": 0}, ValueError, "update_every must be >= 1, got 0"),
        ({"stop_at": 0.0}, ValueError, r"stop_at must be in \(0.0, 1.0\], got 0.0"),
        ({"stop_at": 1.5}, ValueError, r"stop_at must be in \(0.0, 1.0\], got 1.5"),
        ({"pattern": "2:4"}, ValueError, "pattern must be 'unstructured' or 'RxC' blocks .* got '2:4'"),
        ({"init": "zeros"}, ValueError, r"init must be one of \['random', 'magnitude'\], got 'zeros'"),
        ({"redistribution": "magnitude"}, ValueError, r"redistribution must be one of \[None, 'momentum'\]"),
        ({"gamma": -1.0}, ValueError, r"gamma must be in \[0.0, inf\), got -1.0"),
        ({"scale_init": "yes"}, TypeError, "scale_init must be a bool, got str: 'yes'"),
        ({"optimizer_state": "reset"}, ValueError, r"optimizer_state must be one of \['zero', 'keep'\], got 'reset'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicSparseTraining(density=0.1, **kwargs)


def _wrong_shape(param, grad, optimizer_state):
    return torch.zeros(1)


def test_callable_with_wrong_shape_is_rejected():
    dst = DynamicSparseTraining(drop=_wrong_shape, density=0.1, update_every=UPDATE, stop_at=1.0)
    with pytest.raises(ValueError, match=r"criterion '_wrong_shape' returned scores of shape \(1,\), but the "
                                         r"parameter has shape \(8, 4, 2\)"):
        _fit([dst])


class _UnusedLayerNet(harness.HarnessNet):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(8, 8)


def test_gradient_criterion_without_gradient_is_rejected():
    dst = RigL(density=0.5, update_every=1, stop_at=1.0)
    with pytest.raises(ValueError, match=r"criterion 'gradient' needs the gradient of every target, but "
                                         r"\['unused.weight'\] have no gradient \(param.grad is None\)"):
        _fit([dst], model=_UnusedLayerNet())


def test_scheduled_drop_fraction_out_of_range_is_rejected():
    dst = RigL(density=0.1, update_every=UPDATE, stop_at=1.0)
    with pytest.raises(ValueError, match=rf"SparsityScheduler drop_fraction at step {UPDATE} must be in \[0.0, 1.0\)"):
        _fit([_constant_fraction(1.5), dst])


def test_scheduler_density_ramp_is_ignored_with_a_warning():
    dst = RigL(update_every=None)
    with pytest.warns(UserWarning, match="sparse from the first step at density 0.1; the SparsityScheduler's density "
                                         "ramp from 1.0 is not used"):
        _fit([SparsityScheduler(density=0.1), dst], max_steps=1)
    assert dst.masks.global_density() == pytest.approx(0.1, abs=1e-3)


def test_infinite_run_is_rejected():
    with pytest.raises(ValueError, match=r"RigL\(stop_at=0.75\) needs the run's length .* set max_steps"):
        _fit([RigL(density=0.1)], max_steps=-1, max_epochs=-1)
