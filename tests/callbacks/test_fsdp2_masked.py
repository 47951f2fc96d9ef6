"""The FSDP2 case of the harness for the masked-forward algorithms (Spartan, TopKAST, Supermask) on 2 CPU ranks (gloo)
under Lightning's ``ModelParallelStrategy`` with ``fully_shard`` per layer.

Checked inside the run, on every rank:

* every mask update equals one process's computation from the gathered weights (and scores) at that step: the hard
  masks (TopKAST's forward and backward sets, Supermask's tiles, Spartan's hard top-k) bit for bit;
* every forward (training and validation, with gradient accumulation too) all-gathers the effective weight one
  process computes from the gathered dense weights and masks: bit for bit for TopKAST and Supermask (a select), to
  1 ulp for Spartan (its sigmoid rounds differently in the CPU's vector loop and its scalar tail, and which elements
  fall in the tail depends on the tensor's length: a shard's or the whole weight's);
* every gradient that reaches the optimizer equals the single-process autograd gradient of the dense weights from
  the gathered dL/d(effective weight): bit for bit for TopKAST and Supermask (its tile scores' gradient too), to
  float32 rounding for Spartan's soft mask (rtol 1e-5, atol 1e-6 of the largest entry: its threshold term sums the
  ranks' partial sums, in another order than one process's autograd);
* Spartan's soft threshold: not bit-identical to one process's (the solve's float64 sums add the ranks' partial
  sums), but it meets the budget to the solve's tolerance and lies within the distance that tolerance allows from
  one process's threshold (:func:`_check_threshold`).

After the run: exact budgets on the whole masks, identical ranks, and a resume from a mid-run distributed checkpoint
equal to the uninterrupted FSDP2 run bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.fsdp import fully_shard

from lightning_sparse.callbacks import SparsityScheduler, Spartan, Supermask, TopKAST
from lightning_sparse.callbacks._run_end import RESUME_WEIGHTS
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.spartan_budget import solve_budget
from lightning_sparse.callbacks.supermask import SUFFIX
from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.scores import magnitude
from lightning_sparse.core.selection import select_masks
from lightning_sparse.core.soft_mask import soft_group_values, spartan_weight, straight_through_mask, threshold_node
from lightning_sparse.distributed import gather_rows
from tests import fsdp2

pytestmark = pytest.mark.ddp
RTOL = 2e-7  # the float32 solve's relative tolerance on the budget (core/soft_topk_solve.py)


def _whole(callback, name, rows):
    return gather_rows(rows, callback.masks.shards[name])


class Checked:
    """Mixin: compare masks, forwards and gradients with one process's computation on the gathered tensors."""

    checked = forwards = gradients = 0

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        modules = dict(pl_module.named_modules())
        for name in self.masks.params:
            owner, _, attribute = name.rpartition(".")
            modules[owner].register_forward_pre_hook(lambda m, args, n=name, a=attribute: self._seen(n, getattr(m, a)))

    def _seen(self, name, gathered):
        """Inside the forward (after FSDP2's all-gather): the weight the layer computes with."""
        if self._sharded is None or not self._sharded.active:
            return
        dense = _whole(self, name, self._sharded.dense[name])
        expected = self.whole_effective(name, dense, self.masks.full_mask(name))
        if self.exact_gradients:
            assert torch.equal(gathered.detach(), expected), f"forward weight of {name}"
        else:  # the sigmoid: the CPU's vector and scalar (tail) paths round differently, by 1 ulp
            torch.testing.assert_close(gathered.detach(), expected, rtol=2.5e-7, atol=1e-12)
        self.forwards += 1

    def local_gradients(self, dense, grads):
        out = super().local_gradients(dense, grads)
        whole = {name: _whole(self, name, rows) for name, rows in dense.items()}
        with torch.enable_grad():  # the swap-out runs without a graph
            expected = self.whole_gradients(whole, {name: _whole(self, name, g) for name, g in grads.items()})
        for name, rows in out.items():
            got = _whole(self, name, rows)
            if self.exact_gradients:
                assert torch.equal(got, expected[name]), f"gradient of {name}"
            else:  # float32 sums over the budget in another order: rounding of the largest terms
                scale = expected[name].abs().max().item()
                torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6 * scale)
        self.gradients += 1
        return out

    exact_gradients = True  # and forwards: False where the effective weight goes through a sigmoid (Spartan)

    def whole_gradients(self, dense, grads):
        out = {}
        for name, weight in dense.items():
            leaf = weight.clone().requires_grad_()
            out[name] = torch.autograd.grad(self.whole_effective(name, leaf, self.masks.full_mask(name)), leaf,
                                            grads[name])[0]
        return out


class CheckedTopKAST(Checked, TopKAST):
    def compute_masks(self, trainer, pl_module, step):
        masks = super().compute_masks(trainer, pl_module, step)
        whole = {name: magnitude(p.full_tensor()) for name, p in self.masks.params.items()}
        densities, target, fixed = self.layer_densities(step), self.target_density(step), set(self.layer_overrides)
        pooled = target if self.distribution == "global" else None
        expected = select_masks(whole, densities, self.masks.patterns, pooled, fixed)
        for name, mask in masks.items():
            assert torch.equal(_whole(self, name, mask), expected[name]), f"{name} at step {step}"
        if self.backward_density is not None:
            backward = {name: max(d, self.backward_density) for name, d in densities.items()}
            overall = max(target, self.backward_density) if self.distribution == "global" else None
            wider = select_masks(whole, backward, self.masks.patterns, overall, fixed)
            for name, mask in self.backward_masks.items():
                assert torch.equal(_whole(self, name, mask), wider[name] | expected[name]), f"backward {name}"
        self.checked += 1
        return masks

    def _whole_backward(self, name):
        mask = self.backward_masks.get(name)
        return None if mask is None else _whole(self, name, mask).float()

    def whole_effective(self, name, dense, mask):
        return straight_through_mask(dense, mask, self._whole_backward(name))


class CheckedSupermask(Checked, Supermask):
    def _whole_scores(self, name):
        return self.scores[name].full_tensor().detach()

    def compute_masks(self, trainer, pl_module, step):
        masks = super().compute_masks(trainer, pl_module, step)
        densities = self.layer_densities(step)
        for name, mask in masks.items():
            scores = self._whole_scores(name)
            keep = topk_mask(scores.reshape(-1), round(densities[name] * scores.numel()))
            expected = self.masks.pattern_of(name).expand(keep, tuple(self.masks.params[name].shape))
            assert torch.equal(_whole(self, name, mask), expected), f"{name} at step {step}"
        self.checked += 1
        return masks

    def whole_effective(self, name, dense, mask):
        return torch.where(mask, dense, 0.0)

    def local_gradients(self, dense, grads):
        out = super().local_gradients(dense, grads)
        for name in out:  # the scores' gradient too: straight-through, summed over each tile
            from lightning_sparse.callbacks.supermask import supermask_weight

            scores = self._whole_scores(name).requires_grad_()
            leaf = _whole(self, name, dense[name])
            with torch.enable_grad():
                effective = supermask_weight(leaf, scores, self.masks.full_mask(name), self.masks.pattern_of(name))
                expected = torch.autograd.grad(effective, scores, _whole(self, name, grads[name]))[0]
            assert torch.equal(self.scores[name].grad.full_tensor(), expected), f"score gradient of {name}"
        return out


class CheckedSpartan(Checked, Spartan):
    exact_gradients = False

    def compute_masks(self, trainer, pl_module, step):
        previous = dict(self._budgets)
        masks = super().compute_masks(trainer, pl_module, step)
        whole = {name: p.full_tensor().detach() for name, p in self.masks.params.items()}
        for budget in {id(b): b for b in self._budgets.values()}.values():
            names = list(budget.names)
            density = self._density_of(names, step)
            expected, expected_masks = solve_budget(whole, names, self.pattern, self._costs, density,
                                                    budget.sharpness, previous.get(names[0]))
            for name in names:
                assert torch.equal(_whole(self, name, masks[name]), expected_masks[name]), f"{name} at step {step}"
            _check_threshold(whole, names, self.pattern, density, budget, expected.threshold)
        self.checked += 1
        return masks

    def _density_of(self, names, step):
        pooled = self.distribution == "global" and names[0] not in self.layer_overrides
        return self.target_density(step) if pooled else self.layer_densities(step)[names[0]]

    def whole_effective(self, name, dense, mask):
        if self._frozen is not None:
            frozen = self._whole_groups(name, self._frozen[name])
            return dense * self.pattern.expand(frozen, dense.shape)
        budget = self._budgets[name]
        if budget.threshold == -math.inf:
            return dense
        threshold = torch.tensor(budget.threshold, dtype=torch.float32)
        return spartan_weight(dense, self.pattern, threshold, budget.sharpness, mask, self._costs[name])

    def whole_gradients(self, dense, grads):
        """One process's autograd: every layer of a budget computes from one threshold node over all its whole
        weights, as the single-process forward builds it."""
        if self._frozen is not None:
            return super().whole_gradients(dense, grads)
        out = {}
        for budget in {id(self._budgets[n]): self._budgets[n] for n in dense}.values():
            if budget.threshold == -math.inf:
                out.update({n: grads[n] for n in budget.names})
                continue
            leaves = [dense[n].clone().requires_grad_() for n in budget.names]
            node = threshold_node(leaves, self.pattern, budget.threshold, budget.sharpness,
                                  [self._costs[n] for n in budget.names])
            effective = [spartan_weight(leaf, self.pattern, node, budget.sharpness, self.masks.full_mask(n))
                         for n, leaf in zip(budget.names, leaves, strict=True)]
            found = torch.autograd.grad(effective, leaves, [grads[n] for n in budget.names])
            out.update(zip(budget.names, found, strict=True))
        return out


def _check_threshold(whole, names, pattern, density, budget, single):
    r"""The sharded threshold meets the budget to the solve's tolerance, and lies within the distance that tolerance
    allows from one process's threshold: both satisfy :math:`|\sum m - \rho n| \le r \rho n` and
    :math:`d \sum m / dt = -\beta \sum s`, so :math:`|t - t_1| \le 2 r \rho n / (\beta \min \sum s)`; each soft value
    then differs by at most :math:`\beta s_i |t - t_1| \le \beta |t - t_1| / 4`."""
    if budget.threshold == -math.inf:
        assert single == -math.inf
        return
    values = torch.cat([soft_group_values(whole[n], pattern, budget.threshold, budget.sharpness) for n in names])
    target = density * values.numel()
    assert abs(values.double().sum().item() - target) <= 1.01 * RTOL * target
    slope = (values * (1 - values)).double().sum().item()
    bound = 2 * RTOL * target / (budget.sharpness * slope) * 1.5  # 1.5: the slope varies between the thresholds
    assert abs(budget.threshold - single) <= bound, (budget.threshold, single, bound)


SHARPNESS = {"type": "linear", "initial": 1.0, "final": 40.0, "start": 0, "end": 0.75}
CASES = {
    "topkast-dense-backward": lambda: [CheckedTopKAST(density=0.25, update_every=3)],
    "topkast-backward-0.5-4x4": lambda: [CheckedTopKAST(density=0.25, backward_density=0.5, pattern="4x4",
                                                        update_every=3, exclude="head.weight")],
    "topkast-global-scheduled": lambda: [SparsityScheduler(density=0.25, end=0.75),
                                         CheckedTopKAST(backward_density=0.5, distribution="global", update_every=2)],
    "topkast-2:4-backward-3:4": lambda: [CheckedTopKAST(density=0.5, backward_density=0.75, pattern="2:4",
                                                        update_every=3)],
    "supermask-tile-4x4": lambda: [CheckedSupermask(density=0.25, tile_size="4x4", exclude="head.weight")],
    "supermask-scheduled-magnitude": lambda: [SparsityScheduler(density=0.25, end=0.75),
                                              CheckedSupermask(tile_size="4x4", score_init="magnitude",
                                                               exclude="head.weight")],
    "spartan-default": lambda: [CheckedSpartan(density=0.25)],
    "spartan-frozen-before-resume": lambda: [CheckedSpartan(density=0.25, sharpness=5.0, freeze_at=3)],
    "spartan-erk-every-3": lambda: [CheckedSpartan(density=0.25, distribution="erk", update_every=3,
                                                   freeze_at=None)],
    "spartan-global-4x4": lambda: [SparsityScheduler(density=0.25, end=0.25, sharpness=SHARPNESS),
                                   CheckedSpartan(pattern="4x4", distribution="global", freeze_at=0.375,
                                                  exclude="head.weight")],
}


CASES["topkast-accumulate-2-validated"] = lambda: [CheckedTopKAST(density=0.25, backward_density=0.5,
                                                                  update_every=1)]
CASES["spartan-accumulate-2-validated"] = lambda: [CheckedSpartan(density=0.25, freeze_at=None)]
OPTIONS = {  # trainer arguments and model of a case; the defaults: 8 optimizer steps of ShardedNet
    name: {"accumulate_grad_batches": 2, "model": lambda: Validated(), "steps": 4, "validated": True}
    for name in ("topkast-accumulate-2-validated", "spartan-accumulate-2-validated")
}

CASES["spartan-global-a-rank-without-rows"] = lambda: [CheckedSpartan(density=0.25, distribution="global",
                                                                     freeze_at=None)]
CASES["topkast-a-rank-without-rows"] = lambda: [CheckedTopKAST(density=0.25, backward_density=0.5, update_every=2)]
OPTIONS.update({name: {"model": lambda: OneRowHead()}
                for name in ("spartan-global-a-rank-without-rows", "topkast-a-rank-without-rows")})

CASES["supermask-root-only-fully-shard"] = lambda: [CheckedSupermask(density=0.25, tile_size="4x4",
                                                                     exclude="head.weight")]
OPTIONS["supermask-root-only-fully-shard"] = {"model": lambda: RootOnly()}


class RootOnly(fsdp2.ShardedNet):
    """One ``fully_shard`` of the root: every parameter in one group, all-gathered in the root's pre-forward."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()

    def configure_model(self):
        fully_shard(self)


class OneRowHead(fsdp2.ShardedNet):
    """ShardedNet whose head has one row: rank 1 holds none of it."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.head = torch.nn.Linear(24, 1)

    def training_step(self, batch, batch_idx):
        return (self(batch[0]).squeeze(1) - batch[1].float()).pow(2).mean()


class Validated(fsdp2.ShardedNet):
    """ShardedNet with a validation loop (its forwards see the effective weights too, checked)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()

    def validation_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def val_dataloader(self):
        return fsdp2.data()


class Counts(fsdp2.DumpFull):
    """Also the numbers of checked forwards and gradients, and the dense weights the bake kept for a resume."""

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, Checked))
        path = self.root / f"rank{trainer.global_rank}.pt"
        state = torch.load(path, weights_only=True)
        state["counts"] = (callback.forwards, callback.gradients)
        state["dense"] = callback._resume_state[RESUME_WEIGHTS]
        torch.save(state, path)


def _fit(case, callbacks, root, **kwargs):
    options = dict(OPTIONS.get(case, {}))
    options.pop("steps", None)
    options.pop("validated", None)
    model = options.pop("model", None)
    fsdp2.fit(callbacks, root, dump=Counts, model=model and model(), **options, **kwargs)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fsdp2_masked_forward_equals_the_single_process_computation_and_resumes_exactly(case, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    every_epoch = ModelCheckpoint(dirpath=full, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    _fit(case, [*CASES[case](), every_epoch], full)
    ranks = fsdp2.results(full)
    forwards, gradients = ranks[0]["counts"]
    steps = OPTIONS.get(case, {}).get("steps", 8)
    batches = len(ranks[0]["masks"]) * 2 * fsdp2.BATCHES_PER_EPOCH  # per target, 2 epochs (the sanity check's
    # forwards are dense)
    assert ranks[0]["checked"] >= 1 and gradients == steps
    validated = OPTIONS.get(case, {}).get("validated", False)
    assert forwards == batches * (2 if validated else 1), forwards  # training (and validation) forwards
    assert ranks[0]["counts"] == ranks[1]["counts"] and ranks[0]["checked"] == ranks[1]["checked"]
    for key in ("masks", "weights", "dense"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key} of {name} differs between ranks"
    for name, mask in ranks[0]["masks"].items():
        assert not mask.all(), f"{name} was never pruned"
        assert not (ranks[0]["weights"][name][~mask] != 0).any(), f"{name} baked with weights outside its mask"
    kept = {name: int(mask.sum()) for name, mask in ranks[0]["masks"].items()}
    budget = ranks[0]["budget"]
    assert ({"total": sum(kept.values())} if "total" in budget else kept) == budget
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _fit(case, CASES[case](), resumed, ckpt_path=str(full / "epoch=0.ckpt"), enable_checkpointing=False)
    again = fsdp2.results(resumed)[0]
    for key in ("masks", "weights", "dense"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, again[key][name]), f"{key} of {name} differs after resume"


def test_spartan_flops_cost_is_refused_under_fsdp2():
    callback = Spartan(density=0.5, cost="flops")
    stub = type("Stub", (), {"strategy": fsdp2.ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1),
                             "callbacks": [callback]})()
    with pytest.raises(ValueError, match=r"Spartan\(cost='flops'\) is not supported under ModelParallelStrategy "
                                         r"\(FSDP2\).*use cost='params' there"):
        callback.setup(stub, fsdp2.sharded_model(), "fit")


class ScoresLeftOut(fsdp2.ShardedNet):
    """Shards every Linear but leaves Supermask's scores out (``ignored_params``): they stay whole tensors."""

    def configure_model(self):
        scores = {p for name, p in self.named_parameters() if name.endswith(SUFFIX)}
        for module in (self.body[0], self.body[2], self.head):
            fully_shard(module, ignored_params=scores)
        fully_shard(self, ignored_params=scores)


def test_supermask_scores_not_sharded_like_their_weight_are_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(Exception, match=r"Supermask: the scores body.0.weight_supermask_scores are not sharded like "
                                        r"body.0.weight; apply fully_shard to the module that owns both"):
        fsdp2.fit([Supermask(density=0.25, tile_size=4, exclude="head.weight")], tmp_path, model=ScoresLeftOut(),
                  enable_checkpointing=False)


class HeadLeftPlain(fsdp2.ShardedNet):
    """Shards the body's layers only (no root ``fully_shard``): the head's weight stays a plain tensor."""

    def configure_model(self):
        fully_shard(self.body[0])
        fully_shard(self.body[2])


@pytest.mark.parametrize("make", [lambda: TopKAST(density=0.25), lambda: Spartan(density=0.25)], ids=["TopKAST",
                                                                                                   "Spartan"])
def test_a_plain_target_among_sharded_ones_is_refused(make, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(Exception, match=r"under FSDP2 every target must be sharded, but head.weight is a plain tensor; "
                                        r"apply fully_shard to the module that holds it"):
        fsdp2.fit([make()], tmp_path, model=HeadLeftPlain(), enable_checkpointing=False)


class RestoredState(Callback):
    """At train start (after the sparsity callback restored its checkpoint state), write that callback's state."""

    def __init__(self, root):
        self.root = root

    def on_train_start(self, trainer, pl_module):
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback))
        torch.save(callback.state_dict(), self.root / f"restored{trainer.global_rank}.pt")


def _assert_same(saved, restored, where=""):
    assert type(saved) is type(restored) or not isinstance(saved, dict | list), where
    if isinstance(saved, dict):
        assert set(saved) == set(restored), where
        for key in saved:
            _assert_same(saved[key], restored[key], f"{where}/{key}")
    elif isinstance(saved, list | tuple):
        for i, (a, b) in enumerate(zip(saved, restored, strict=True)):
            _assert_same(a, b, f"{where}/{i}")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, restored), where
    else:
        assert saved == restored, where


@pytest.mark.parametrize("case", ["topkast-backward-0.5-4x4", "supermask-tile-4x4", "spartan-frozen-before-resume"])
def test_a_checkpoint_of_2_ranks_resumes_on_1_rank_with_the_whole_state(case, tmp_path):
    (tmp_path / "full").mkdir()
    _fit(case, [*CASES[case](), ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1,
                                                filename="{epoch}")], tmp_path / "full")
    saved = torch.load(tmp_path / "epoch=0.ckpt" / "meta.pt", weights_only=True)["callbacks"]
    callbacks = CASES[case]()
    fsdp2.fit([*callbacks, RestoredState(tmp_path)], tmp_path, ckpt_path=str(tmp_path / "epoch=0.ckpt"), world=1,
              dump=Counts, enable_checkpointing=False)
    state_key = next(cb for cb in callbacks if isinstance(cb, SparsityCallback)).state_key
    _assert_same(saved[state_key], torch.load(tmp_path / "restored0.pt", weights_only=True))
