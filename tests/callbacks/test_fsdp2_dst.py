"""Dynamic sparse training (SET, RigL, SNFS, MEST and other drop x grow pairs) under FSDP2: 2 CPU ranks (gloo),
Lightning's ``ModelParallelStrategy``, ``fully_shard`` per layer. Every mask update inside the run equals the update
one process computes from the gathered weights, masks, gradients, momentum and generator; the whole weights keep
exactly the budget; ranks agree; a resume from the distributed checkpoint equals the uninterrupted run bit for bit;
the elements passed to collectives per update do not depend on the layer sizes; what FSDP2 cannot run is refused."""

import copy
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_sparse.callbacks import MEST, SET, SNFS, DynamicSparseTraining, RigL
from lightning_sparse.core.criteria import register_criterion
from lightning_sparse.core.density import allocate_densities
from lightning_sparse.core.patterns import Blocks
from lightning_sparse.distributed import TRAFFIC, gather_rows, local
from lightning_sparse.masking import MaskState
from tests import fsdp2

pytestmark = pytest.mark.ddp


class CheckedDST:
    """Mixin: every update is compared with one process's update on the whole tensors (a copy of the callback
    holding plain parameters with the gathered values, the gathered masks, gradients and momentum, and the
    generator's state), including where the generator ends up."""

    checked = 0
    rewired = 0  # positions changed by the rewiring updates (not the initial masks)

    def compute_masks(self, trainer, pl_module, step):
        reference = self._single_process_copy()
        before = TRAFFIC["elements"]
        masks = super().compute_masks(trainer, pl_module, step)
        self.traffic = [*getattr(self, "traffic", []), TRAFFIC["elements"] - before]
        self.updates = [*getattr(self, "updates", []), step]
        initial = reference.last_update_step < 0
        expected = DynamicSparseTraining.compute_masks(reference, trainer, pl_module, step)
        for name, mask in masks.items():
            whole = gather_rows(mask, self.masks.shards[name])
            assert torch.equal(whole, expected[name]), f"{name} at step {step}"
            if not initial:
                self.rewired += int((whole ^ reference.masks.masks[name]).sum())
        assert torch.equal(self.generator.get_state(), reference.generator.get_state()), f"generator at step {step}"
        self.checked += 1
        return masks

    def _single_process_copy(self):
        shards = self.masks.shards
        whole = {name: p.full_tensor().detach().clone() for name, p in self.masks.params.items()}
        reference = copy.copy(self)
        reference.masks = MaskState({name: nn.Parameter(w) for name, w in whole.items()}, self.pattern, self._layouts)
        reference.masks.set_masks({name: gather_rows(m, shards[name]) for name, m in self.masks.masks.items()})
        if self._grads is not None:
            reference._grads = {name: gather_rows(g, shards[name]) for name, g in self._grads.items()}
        if self.momentum is not None:
            reference.momentum = {name: gather_rows(m, shards[name]) for name, m in self.momentum.items()}
        reference.generator = torch.Generator()
        reference.generator.set_state(self.generator.get_state())
        return reference


def checked(cls):
    return type(f"Checked{cls.__name__}", (CheckedDST, cls), {})


CASES = {
    "SET": lambda: checked(SET)(density=0.3, update_every=1),
    "set-sign-drop": lambda: checked(DynamicSparseTraining)(drop="set", grow="random", density=0.3, update_every=2,
                                                            stop_at=1.0, distribution="uniform", init="magnitude"),
    "RigL": lambda: checked(RigL)(density=0.3, update_every=2, stop_at=1.0),
    "RigL-global-4x4": lambda: checked(RigL)(density=0.4, pattern="4x4", distribution="global", exclude="head.weight",
                                             update_every=2, stop_at=1.0, drop_fraction=0.5),
    "SNFS": lambda: checked(SNFS)(density=0.3, update_every=2),
    "MEST": lambda: checked(MEST)(density=0.3, update_every=2, stop_at=1.0, scale_init=True, optimizer_state="keep"),
    "MEST-random": lambda: checked(MEST)(density=0.3, grow="random", update_every=1, stop_at=1.0),
    "snip-momentum": lambda: checked(DynamicSparseTraining)(drop="snip", grow="momentum", density=0.3,
                                                            update_every=2, stop_at=1.0, distribution="er"),
}
UPDATES = {"SET": 8, "MEST-random": 8}  # initial masks + rewiring steps in the 8-step run (others: 0, 2, 4, 6)


class _Rewired(Callback):
    """At fit end on each rank: the rewiring updates changed some mask (else the checks compare unchanged masks)."""

    def __init__(self, callback):
        self.callback = callback

    def on_fit_end(self, trainer, pl_module):
        assert self.callback.rewired > 0, "the rewiring updates never changed a mask"


def _initial_budget(callback, masks):
    """Weights each layer keeps: the initial allocation's (SNFS moves counts between layers: their sum)."""
    shapes = {name: tuple(m.shape) for name, m in masks.items()}
    pattern, density = callback.pattern, callback.final_density
    size = pattern.rows * pattern.cols if isinstance(pattern, Blocks) else 1
    if callback.distribution == "global":
        return {"total": round(density * sum(pattern.num_groups(s) for s in shapes.values())) * size}
    densities = allocate_densities(shapes, density, callback.distribution)
    kept = {name: round(densities[name] * pattern.num_groups(s)) * size for name, s in shapes.items()}
    return {"total": sum(kept.values())} if callback.redistribution else kept


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fsdp2_updates_equal_the_single_process_update_and_resume_exactly(case, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    every_epoch = ModelCheckpoint(dirpath=full, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    callback = CASES[case]()
    fsdp2.fit([callback, _Rewired(callback), every_epoch], full)
    ranks = fsdp2.results(full)
    assert ranks[0]["checked"] == ranks[1]["checked"] == UPDATES.get(case, 4)
    assert ranks[0]["updates"] == ranks[1]["updates"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"mask of {name} differs between ranks"
        assert not (ranks[0]["weights"][name][~mask] != 0).any(), f"{name} has weights outside its mask"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"{name} differs between ranks"
    kept = {name: int(mask.sum()) for name, mask in ranks[0]["masks"].items()}
    budget = _initial_budget(callback, ranks[0]["masks"])
    assert ({"total": sum(kept.values())} if "total" in budget else kept) == budget
    assert ranks[0]["density"] == sum(kept.values()) / sum(m.numel() for m in ranks[0]["masks"].values())
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    again_callback = CASES[case]()
    fsdp2.fit([again_callback], resumed, ckpt_path=str(full / "epoch=0.ckpt"), enable_checkpointing=False)
    again = fsdp2.results(resumed)[0]
    assert again["updates"] == [s for s in ranks[0]["updates"] if s > fsdp2.BATCHES_PER_EPOCH]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, again["masks"][name]), f"mask of {name} differs after resume"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, again["weights"][name]), f"{name} differs after resume"


# per update of the 3 layers: one all-reduce of the active counts (3); per layer and selection a finiteness flag
# (1), the size all-reduce (1), 4 radix rounds of 256 bins and one tie count per rank (2). RigL: a drop and a grow
# selection per layer; SNFS adds the momentum means (a max and a sum and count per layer: 9); SET's sign-split drop
# adds the two sign counts per layer and selects each sign apart (its random growth moves nothing but the selection).
SELECTION = 1 + 1 + 4 * 256 + 2
REWIRE_TRAFFIC = {"RigL": 3 + 3 * 2 * SELECTION, "SNFS": 3 + 9 + 3 * 2 * SELECTION,
                  "set-drop": 3 + 3 * (2 + 3 * SELECTION)}
# uniform densities: ERK would keep a narrow layer dense (no selection) next to a wide one. seed=1: the callback's
# generator with seed 0 draws the very numbers torch.manual_seed(0) drew for the weights' init, so seed-0 random masks
# hold the largest positive weights only, and SET's negative side would select nothing.
TRAFFIC_CASES = {
    "RigL": lambda: checked(RigL)(density=0.3, distribution="uniform", update_every=2, stop_at=1.0, init="magnitude"),
    "SNFS": lambda: checked(SNFS)(density=0.3, distribution="uniform", update_every=2, init="magnitude"),
    "set-drop": lambda: checked(DynamicSparseTraining)(drop="set", grow="random", density=0.3, distribution="uniform",
                                                       update_every=2, stop_at=1.0, seed=1),
}


@pytest.mark.parametrize("case", list(TRAFFIC_CASES), ids=list(TRAFFIC_CASES))
def test_elements_passed_to_collectives_per_update_do_not_grow_with_the_layers(case, tmp_path):
    traffic = []
    for hidden in (40, 400):  # 640 + 960 and 6400 + 9600 weights in the two wide layers
        root = tmp_path / str(hidden)
        root.mkdir()
        fsdp2.fit([TRAFFIC_CASES[case]()], root, epochs=1, model=fsdp2.sharded_model(hidden),
                  enable_checkpointing=False)
        traffic.append(fsdp2.results(root)[0]["traffic"])
    assert traffic[0] == traffic[1] == [3 * (1 + 4 * 256 + 2), REWIRE_TRAFFIC[case]]  # initial masks, one rewiring


class _Unused(fsdp2.ShardedNet):
    """ShardedNet with one more sharded Linear that the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(16, 8)

    def configure_model(self):
        fully_shard(self.unused)
        super().configure_model()


def test_a_target_without_gradient_is_an_error_for_gradient_criteria(tmp_path):
    torch.manual_seed(0)
    callback = RigL(density=0.5, update_every=2, include=["body.0.weight", "unused.weight"])
    with pytest.raises(Exception, match=r"criterion 'gradient' needs the gradient of every target, but "
                                        r"\['unused.weight'\] have no gradient"):
        fsdp2.fit([callback], tmp_path, epochs=1, model=_Unused(), enable_checkpointing=False)


class _PoisonRankZero(Callback):
    """Before the DST callback: a NaN in rank 0's shard of a gradient at optimizer step ``step`` (rank 1's shard
    stays finite); :class:`_Heal` puts the value back after the DST callback, so the optimizer steps as usual."""

    def __init__(self, step):
        self.step, self.saved = step, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.step and trainer.global_rank == 0:
            grad = local(pl_module.body[0].weight.grad)
            self.saved = grad[0, 0].clone()
            grad[0, 0] = float("nan")


class _Heal(Callback):
    def __init__(self, poison):
        self.poison = poison

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.poison.saved is not None:
            local(pl_module.body[0].weight.grad)[0, 0] = self.poison.saved
            self.poison.saved = None


def test_a_non_finite_gradient_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    poison = _PoisonRankZero(step=2)
    callback = checked(RigL)(density=0.3, update_every=2, stop_at=1.0)
    strategy = fsdp2.ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                         callbacks=[poison, callback, _Heal(poison), fsdp2.DumpFull(tmp_path)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(fsdp2.sharded_model(), fsdp2.data())
    ranks = fsdp2.results(tmp_path)
    assert ranks[0]["updates"] == ranks[1]["updates"] == [0]  # the step-2 update skipped on both ranks


def _stub(callback):
    class Stub:
        strategy = fsdp2.ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1)
        callbacks = [callback]

    return Stub()


register_criterion("fsdp2_test_taylor", lambda w, g, state: (w * g) ** 2)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: DynamicSparseTraining(drop=lambda w, g, s: w.abs(), density=0.5),
     r"DynamicSparseTraining\(drop='<lambda>[^']*'\) is not supported under ModelParallelStrategy \(FSDP2\).*"
     r"what works: drop in \['magnitude', 'set', 'mest', 'snip', 'reciprocal_sensitivity', 'random'\]"),
    (lambda: MEST(grow="fsdp2_test_taylor", density=0.5),
     r"MEST\(grow='fsdp2_test_taylor'\) is not supported under ModelParallelStrategy \(FSDP2\).*what works: "
     r"grow in \['random', 'gradient', 'momentum'\]"),
], ids=["callable-drop", "registered-grow"])
def test_custom_criteria_are_refused_at_setup_under_fsdp2(make, match):
    callback = make()
    with pytest.raises(ValueError, match=match):
        callback.setup(_stub(callback), fsdp2.sharded_model(), "fit")
