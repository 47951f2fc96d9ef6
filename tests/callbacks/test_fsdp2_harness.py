"""The FSDP2 case of the harness: MagnitudePruning and NMSparsity on 2 CPU ranks (gloo) under Lightning's
``ModelParallelStrategy`` with ``fully_shard`` per layer. Every mask update equals the single-process selection on the
gathered scores (checked inside the run), the whole weights keep exactly the budget, ranks agree, and a resume from the
distributed checkpoint equals the uninterrupted run bit for bit. A callback that says it does not support FSDP2
refuses the strategy."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sparse.callbacks import (
    MagnitudePruning,
    NMSparsity,
    SparsityScheduler,
)
from lightning_sparse.core.scores import magnitude
from lightning_sparse.core.selection import select_masks
from lightning_sparse.distributed import TRAFFIC, gather_rows
from tests import fsdp2

pytestmark = pytest.mark.ddp


class Checked:
    """Mixin: after computing the sharded masks, compare them with one process's selection on the whole scores."""

    checked = 0

    def compute_masks(self, trainer, pl_module, step):
        before = TRAFFIC["elements"]
        masks = super().compute_masks(trainer, pl_module, step)
        self.traffic = TRAFFIC["elements"] - before
        whole = {name: p.full_tensor().detach() for name, p in self.masks.params.items()}
        patterns = {name: self.masks.pattern_of(name) for name in whole}
        global_density = self.target_density(step) if self.distribution == "global" else None
        expected = select_masks({n: magnitude(w) for n, w in whole.items()}, self.layer_densities(step), patterns,
                                global_density, set(self.layer_overrides))
        for name, mask in masks.items():
            assert torch.equal(gather_rows(mask, self.masks.shards[name]), expected[name]), f"{name} at step {step}"
        self.checked += 1
        return masks


class CheckedPruning(Checked, MagnitudePruning):
    pass


class CheckedNM(Checked, NMSparsity):
    pass


CASES = {
    "gmp-unstructured": lambda: [SparsityScheduler(density=0.3, end=0.75), CheckedPruning(update_every=2)],
    "gmp-erk": lambda: [SparsityScheduler(density=0.3, end=0.75), CheckedPruning(update_every=2, distribution="erk")],
    "gmp-global": lambda: [SparsityScheduler(density=0.3, end=0.75),
                           CheckedPruning(update_every=3, distribution="global")],
    "one-shot-4x4": lambda: [CheckedPruning(density=0.25, pattern="4x4", at_step=2, exclude="head.weight")],
    "nm-2:4": lambda: [CheckedNM(n=2, m=4, at_step=2, reselect_every=3)],
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fsdp2_masks_equal_the_single_process_selection_and_resume_exactly(case, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    every_epoch = ModelCheckpoint(dirpath=full, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    fsdp2.fit([*CASES[case](), every_epoch], full)
    ranks = fsdp2.results(full)
    assert ranks[0]["checked"] >= 1 and ranks[0]["checked"] == ranks[1]["checked"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"mask of {name} differs between ranks"
        assert not mask.all(), f"{name} was never pruned"
        assert not (ranks[0]["weights"][name][~mask] != 0).any(), f"{name} has weights outside its mask"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"{name} differs between ranks"
    kept = {name: int(mask.sum()) for name, mask in ranks[0]["masks"].items()}
    budget = ranks[0]["budget"]
    assert ({"total": sum(kept.values())} if "total" in budget else kept) == budget
    assert ranks[0]["density"] == sum(kept.values()) / sum(m.numel() for m in ranks[0]["masks"].values())
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    fsdp2.fit(CASES[case](), resumed, ckpt_path=str(full / "epoch=0.ckpt"), enable_checkpointing=False)
    again = fsdp2.results(resumed)[0]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, again["masks"][name]), f"mask of {name} differs after resume"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, again["weights"][name]), f"{name} differs after resume"


def test_a_mask_update_passes_a_fixed_number_of_elements_to_collectives(tmp_path):
    fsdp2.fit([CheckedPruning(density=0.3, at_step=1)], tmp_path, epochs=1, enable_checkpointing=False)
    # per layer: the size all-reduce, 4 radix rounds of 256 bins, one tie count per rank: 3 layers of 640-1120
    # weights move 3 * 1027 elements, whatever their size (tests/test_distributed.py varies the size)
    assert fsdp2.results(tmp_path)[0]["traffic"] == 3 * (1 + 4 * 256 + 2)


class _NoFSDP2(MagnitudePruning):
    """A user's subclass that says it does not run under FSDP2 (every bundled algorithm does)."""

    supports_fsdp2 = False


def test_algorithms_without_fsdp2_support_refuse_the_strategy(tmp_path):
    callback = _NoFSDP2(density=0.5)
    trainer_strategy = fsdp2.ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1)

    class Stub:
        strategy = trainer_strategy
        callbacks = [callback]

    with pytest.raises(ValueError, match=r"_NoFSDP2 does not support ModelParallelStrategy \(FSDP2\) yet; what works: "
                                         r".*DynamicSparseTraining, MEST, MagnitudePruning, NMSparsity, RigL, SET, "
                                         r"SNFS, SparseGPT, Spartan, Supermask, TopKAST"):
        callback.setup(Stub(), fsdp2.sharded_model(), "fit")


class _Stub:
    def __init__(self, strategy, callbacks):
        self.strategy, self.callbacks = strategy, callbacks


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_flat_parameter_strategies_are_refused(name):
    callback = MagnitudePruning(density=0.5)
    with pytest.raises(ValueError, match=rf"MagnitudePruning does not support {name} \(its parameters are flattened"):
        callback.setup(_Stub(type(name, (), {})(), [callback]), fsdp2.sharded_model(), "fit")


def test_targets_gone_after_configure_model_are_an_error():
    callback = MagnitudePruning(density=0.5)
    callback.setup(_Stub(object(), [callback]), fsdp2.sharded_model(), "fit")
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"the targets \['body.0.weight', .*\] are gone from the model after "
                                         r"configure_model"):
        callback.on_fit_start(None, other)
