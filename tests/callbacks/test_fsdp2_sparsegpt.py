"""SparseGPT under FSDP2 (2 CPU ranks, gloo, ``ModelParallelStrategy``): Hessians from both ranks' calibration
batches, one whole layer at a time, equal to one process pruning the gathered model on all the batches; exact
budgets, identical ranks, and a resume from the distributed checkpoint equal to the uninterrupted run."""

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sparse.callbacks import SparseGPT
from lightning_sparse.callbacks.sparsegpt import sparsegpt_
from lightning_sparse.distributed import gather_rows
from tests import fsdp2

pytestmark = pytest.mark.ddp


class CheckedSparseGPT(SparseGPT):
    """Compares its sharded pruning with one process's ``sparsegpt_`` on the gathered model and all ranks' batches."""

    checked = 0

    def compute_masks(self, trainer, pl_module, step):
        dense = {name: fsdp2.whole(p) for name, p in pl_module.named_parameters()}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self._calibration_batches(trainer))
        masks = super().compute_masks(trainer, pl_module, step)
        reference = fsdp2.PlainBlockNet() if isinstance(pl_module, fsdp2.BlockNet) else fsdp2.PlainNet()
        reference.load_state_dict(dense)
        options = {"nm": str(self.pattern)} if self.pattern.__class__.__name__ == "NM" else {"density": self.density}
        expected = sparsegpt_(reference, [b for batches in everyone for b in batches], progress=False,
                              include=self.include, **options)
        for name, mask in masks.items():
            assert torch.equal(gather_rows(mask, self.masks.shards[name]), expected[name]), name
            assert torch.equal(fsdp2.whole(pl_module.get_parameter(name)), reference.get_parameter(name)), name
        self.checked += 1
        return masks


CASES = {
    "2:4": (lambda: CheckedSparseGPT(nm="2:4", calibration_batches=2), fsdp2.sharded_model),
    "unstructured-at-step": (lambda: CheckedSparseGPT(density=0.4, at=3, calibration_batches=3), fsdp2.sharded_model),
    "blocks-2:4": (lambda: CheckedSparseGPT(nm="2:4", include="blocks.*.weight", calibration_batches=2),
                   fsdp2.block_model),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sharded_sparsegpt_equals_one_process_and_resumes_exactly(case, tmp_path):
    make, model = CASES[case]
    full = tmp_path / "full"
    full.mkdir()
    every_epoch = ModelCheckpoint(dirpath=full, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    fsdp2.fit([make(), every_epoch], full, model=model())
    ranks = fsdp2.results(full)
    assert ranks[0]["checked"] == ranks[1]["checked"] == 1
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"mask of {name} differs between ranks"
        assert not (ranks[0]["weights"][name][~mask] != 0).any(), f"{name} has weights outside its mask"
    kept = {name: int(mask.sum()) for name, mask in ranks[0]["masks"].items()}
    assert kept == ranks[0]["budget"]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"{name} differs between ranks"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    fsdp2.fit([make()], resumed, ckpt_path=str(full / "epoch=0.ckpt"), enable_checkpointing=False, model=model())
    again = fsdp2.results(resumed)[0]
    assert again["checked"] == 0  # pruned once, before the checkpoint: never again
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, again["masks"][name]), f"mask of {name} differs after resume"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, again["weights"][name]), f"{name} differs after resume"
