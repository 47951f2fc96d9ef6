"""Spartan: schedules, exact budget at every step, gradients, frozen phase, FLOPs costs, export, argument errors."""

import copy
import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_sparse.callbacks import SparsityScheduler, Spartan
from lightning_sparse.core.patterns import Blocks, Unstructured
from lightning_sparse.core.soft_mask import soft_topk_threshold
from lightning_sparse.models import TinyViT
from tests import harness


def _fit(callbacks, model=None, data=None, **kwargs):
    model = model or harness.plain_model()
    trainer = pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, **{"max_epochs": 2, **kwargs},
    )
    trainer.fit(model, harness.harness_data() if data is None else data)
    return model


class BudgetProbe(pl.Callback):
    """After every step: exact hard budget, forward support inside the mask, gradient supports before/after freezing."""

    def __init__(self):
        self.kept, self.frozen_steps, self.pruned_grads = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        spartan = harness.sparsity_callback(trainer.callbacks)
        grads = [p.grad[~spartan.masks.masks[n]] for n, p in spartan.masks.params.items()]
        if sum(g.numel() for g in grads):
            self.pruned_grads.append((spartan.frozen, int(sum((g != 0).sum() for g in grads))))

    def on_train_batch_end(self, trainer, pl_module, *args):
        spartan = harness.sparsity_callback(trainer.callbacks)
        densities = spartan.layer_densities(spartan.last_update_step)
        effective = spartan.effective_weights()
        for name, mask in spartan.masks.masks.items():
            expected = harness.expected_kept(spartan, name, densities[name])
            self.kept.append((int(mask.sum()), expected))
            assert not effective[name][~mask].any(), f"{name}: the forward uses weights outside the hard mask"
        self.frozen_steps.append(spartan.frozen)


@pytest.mark.parametrize("pattern", ["unstructured", "4x4"])
def test_exact_budget_every_step_and_gradients_before_and_after_freezing(pattern):
    probe = BudgetProbe()
    _fit([Spartan(density=0.3, pattern=pattern, freeze_at=0.5), probe])
    assert len(probe.kept) == 4 * 8 and all(kept == expected for kept, expected in probe.kept)
    assert probe.frozen_steps == [False] * 3 + [True] * 5
    before = [count for frozen, count in probe.pruned_grads if not frozen]
    after = [count for frozen, count in probe.pruned_grads if frozen]
    assert before and all(count > 0 for count in before)  # pruned weights keep learning through the soft mask
    assert after and all(count == 0 for count in after)  # the frozen mask is fixed: no gradient outside it


def test_default_schedules_follow_the_reference():
    spartan = Spartan(density=0.1, pattern="4x4")
    _fit([spartan], max_epochs=None, max_steps=10, limit_train_batches=4, max_time=None)
    assert spartan.target_density(0) == 1.0 and spartan.target_density(1) == pytest.approx(0.55)
    assert spartan.target_density(2) == pytest.approx(0.1)  # 20% of 10 steps
    assert spartan.sharpness_at(4) == pytest.approx(4 * (1 + 19 * 4 / 8))  # beta ramps to freeze_at=0.8, x sqrt(16)
    assert spartan.sharpness_at(10) == pytest.approx(4 * 20.0)
    assert spartan.frozen


def test_soft_values_survive_into_the_export_and_match_the_forward():
    spartan = Spartan(density=0.3, sharpness=8.0, freeze_at=None, bake_at_end=False)
    model = _fit([spartan])
    x = next(iter(harness.harness_data()))[0]
    model.eval()
    with torch.no_grad():
        trained = model(x)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    assert any((dense[n][~m] != 0).any() for n, m in spartan.masks.masks.items())  # dense weights until baked
    effective = spartan.effective_weights()
    conv = effective["conv.weight"][spartan.masks.masks["conv.weight"]]
    assert (conv.abs() < dense["conv.weight"][spartan.masks.masks["conv.weight"]].abs()).all()  # scaled by m < 1
    spartan.bake()
    plain = harness.plain_model()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), trained)
        assert torch.equal(model(x), trained)
    assert all(torch.equal(model.state_dict()[n], w) for n, w in effective.items())
    assert spartan.baked
    spartan.bake()  # a second bake must not apply the soft mask again
    assert all(torch.equal(model.state_dict()[n], w) for n, w in effective.items())


def test_model_deepcopy_and_callback_pickle_while_masks_are_live():
    spartan = Spartan(density=0.3, freeze_at=None, bake_at_end=False)
    model = _fit([spartan], max_epochs=1)
    x = next(iter(harness.harness_data()))[0]
    model(x).sum().backward()  # caches the shared threshold node, a graph
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(spartan))
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        clone.head.weight.zero_()
        assert not torch.equal(clone(x), model(x))  # the copy computes with its own parameters
    assert restored.state_key == spartan.state_key
    assert all(torch.equal(restored.masks.masks[n], m) for n, m in spartan.masks.masks.items())


class CheckpointedNet(harness.HarnessNet):
    def forward(self, x):
        hidden = torch.relu(self.conv(x)).flatten(1)
        return self.head(checkpoint(self.body, hidden, use_reentrant=False))


def _data(batch_size):
    data = harness.harness_data()
    return torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, shuffle=False)


def test_gradient_accumulation_and_activation_checkpointing_match_plain_training():
    def weights(model_cls, batch_size, accumulate):
        torch.manual_seed(0)
        model = model_cls()
        _fit([Spartan(density=0.3, distribution="global", freeze_at=None, bake_at_end=False)], model,
             _data(batch_size), accumulate_grad_batches=accumulate, max_epochs=1)
        return [p.detach() for p in model.parameters()]

    reference = weights(harness.HarnessNet, 16, 1)
    for got in (weights(harness.HarnessNet, 8, 2), weights(CheckpointedNet, 16, 1)):
        for p, q in zip(got, reference, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_flops_costs_weigh_the_global_budget():
    def conv_density(cost):
        spartan = Spartan(density=0.3, distribution="global", cost=cost, freeze_at=None, bake_at_end=False)
        _fit([spartan], max_epochs=1)
        return spartan

    flops, params = conv_density("flops"), conv_density("params")
    assert flops.costs == {"conv.weight": 8.0, "body.0.weight": 1.0, "body.2.weight": 1.0, "head.weight": 1.0}
    kept_cost = sum(flops.costs[n] * int(m.sum()) for n, m in flops.masks.masks.items())
    budget = 0.3 * sum(flops.costs[n] * m.numel() for n, m in flops.masks.masks.items())
    assert abs(kept_cost - budget) <= 4.0  # the prefix closest to the budget: within half the largest cost
    assert flops.masks.density("conv.weight") < params.masks.density("conv.weight")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0.0}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 0.1, "sharpness": 0.0}, ValueError, "sharpness must be a finite number > 0"),
        ({"density": 0.1, "sharpness": -2.0}, ValueError, "sharpness must be a finite number > 0"),
        ({"density": 0.1, "sharpness": "sharp"}, TypeError, "sharpness must be a float"),
        ({"density": 0.1, "cost": "bytes"}, ValueError, r"cost must be one of \['params', 'flops'\]"),
        ({"density": 0.5, "pattern": "2:4"}, ValueError, "Spartan supports 'unstructured' and 'RxC' block"),
        ({"density": 0.1, "freeze_at": 1.5}, ValueError, "freeze_at must be an int step >= 0 or a float fraction"),
        ({"density": 0.1, "freeze_at": "late"}, TypeError, "freeze_at must be an int step"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Spartan(**kwargs)


class _NoLength(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from harness.harness_data().dataset


def test_setup_and_schedule_errors():
    with pytest.raises(ValueError, match="needs a sharpness > 0"):
        _fit([SparsityScheduler(0.25, sharpness=-1.0), Spartan()])
    with pytest.raises(ValueError, match="conflicts with the SparsityScheduler's sharpness"):
        _fit([SparsityScheduler(0.25, sharpness=5.0), Spartan(sharpness=5.0)])
    with pytest.raises(ValueError, match=r"pattern=.3x3. \(3x3 blocks of the \(out, in\) view\) does not tile "
                       r"conv.weight: a Conv1d weight stored as \(8, 4, 2\)"):
        _fit([Spartan(density=0.25, pattern="3x3")])
    endless = torch.utils.data.DataLoader(_NoLength(), batch_size=16)
    with pytest.raises(ValueError, match=r"^Spartan\(freeze_at=0.8\) needs the run's length, which is unknown here"):
        _fit([Spartan(density=0.25)], data=endless, max_epochs=1)
    with pytest.raises(ValueError, match="before the density reaches its final value at step 6; freeze later: "
                       r"freeze_at=6 \(or a fraction >= 0.75 of the run\)"):
        _fit([SparsityScheduler(0.25, end=0.75), Spartan(freeze_at=0.5)])
    scores = torch.rand(10)
    with pytest.raises(ValueError, match="costs must have the shape of scores"):
        soft_topk_threshold(scores, 0.5, 1.0, costs=torch.ones(9))
    with pytest.raises(ValueError, match="costs must be positive"):
        soft_topk_threshold(scores, 0.5, 1.0, costs=-torch.ones(10))
    with pytest.raises(ValueError, match="sharpness must be a finite number > 0"):
        soft_topk_threshold(scores, 0.5, 0.0)


def test_block_sparse_vit_with_multihead_attention():
    def vit():
        torch.manual_seed(0)
        return TinyViT(image_size=8, patch_size=4, dim=32, depth=1, heads=2, scheduler=None)

    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.randint(0, 10, (32,))), 8)
    spartan = Spartan(density=0.25, pattern="16x16", distribution="global", exclude=["head.weight"])
    spec = harness.HarnessModel("vit", vit, lambda: data, lambda model, batch: model(batch[0][:8]))
    final = harness.FinalOutput(spec)
    model = _fit([final, spartan], vit(), data)
    assert {"blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"} <= set(spartan.masks.masks)
    harness.check_exact_density(model, spartan, 8)
    plain = vit()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images[:8]), final.output, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", [Unstructured(), Blocks(2, 2)])
def test_pooled_magnitudes_equal_each_layers_group_magnitudes_in_order(pattern):
    from lightning_sparse.callbacks.spartan_budget import _pooled_magnitudes
    from lightning_sparse.core.soft_mask import group_magnitudes

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 6, generator=generator), torch.randn(2, 2, generator=generator).bfloat16(),
               torch.randn(6, 4, generator=generator)]
    flat, sizes = _pooled_magnitudes(weights, pattern)
    expected = [group_magnitudes(w, pattern) for w in weights]
    assert sizes == [e.numel() for e in expected]
    assert flat.dtype == torch.float32 and torch.equal(flat, torch.cat(expected))
    single, _ = _pooled_magnitudes(weights[:1], pattern)
    assert torch.equal(single, expected[0])


def test_the_solve_starts_from_the_thresholds_linear_drift_and_keeps_it_in_the_state():
    from lightning_sparse.callbacks.spartan_budget import Budget, _guess

    assert _guess(None) is None
    assert _guess(Budget(("w",), -math.inf, 1.0)) is None  # density 1: nothing to start from
    assert _guess(Budget(("w",), 0.5, 1.0)) == 0.5
    assert _guess(Budget(("w",), 0.5, 1.0, before=0.4)) == pytest.approx(0.6)
    assert _guess(Budget(("w",), 0.5, 1.0, before=-math.inf)) == 0.5
    budget = Budget(("a", "b"), 0.5, 3.0, before=0.4)
    assert Budget.from_state(budget.to_state()) == budget
    old = {"names": ["a", "b"], "threshold": 0.5, "sharpness": 3.0}  # a checkpoint from before the drift was kept
    assert Budget.from_state(old).before is None


def test_extrapolated_starts_give_thresholds_within_the_solver_tolerance():
    from lightning_sparse.callbacks.spartan_budget import solve_budget

    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(300, 400, generator=generator)}
    previous = None
    for _ in range(4):
        params["w"].add_(torch.randn(300, 400, generator=generator), alpha=1e-3)
        previous, _ = solve_budget(params, ["w"], Unstructured(), {"w": 1.0}, 0.1, 20.0, previous)
        kept = torch.sigmoid(20.0 * (params["w"].abs().double() - previous.threshold)).sum().item()
        assert kept == pytest.approx(0.1 * 120_000, rel=1e-6)
    assert previous.before is not None
