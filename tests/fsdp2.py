"""FSDP2 on 2 CPU ranks for the tests: Lightning's ``ModelParallelStrategy`` with forked processes (its own
launcher re-runs the whole command per rank), a small model that ``fully_shard`` s each Linear, and what each rank
writes when fit ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_sparse.callbacks.base import SparsityCallback
from tests.harness import expected_kept

BATCHES_PER_EPOCH = 4


class _ForkLauncher(_MultiProcessingLauncher):
    def _recover_results_in_main_process(self, worker_output: Any, trainer: pl.Trainer) -> None:
        """The ranks write what the tests read; the main process keeps its unsharded model."""


class ForkedModelParallel(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose ranks are forked from the test process."""

    def _configure_launcher(self) -> None:
        self._launcher = _ForkLauncher(self, start_method="fork")

    def setup_environment(self) -> None:
        """One thread per rank, also for one rank (Lightning gives each rank cpus / ranks threads): a forked child
        that starts an OpenMP team of the parent's deadlocks in libgomp (seen with 1 rank after earlier tests)."""
        super().setup_environment()
        torch.set_num_threads(1)


class ShardedNet(pl.LightningModule):
    """3 Linear layers with 40, 24 and 7 rows (the last split 4 + 3 over 2 ranks), each ``fully_shard`` ed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU())
        self.head = nn.Linear(24, 7)

    def configure_model(self) -> None:
        for module in (self.body[0], self.body[2], self.head):
            fully_shard(module)
        fully_shard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def sharded_model() -> ShardedNet:
    torch.manual_seed(0)
    return ShardedNet()


def data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16 * BATCHES_PER_EPOCH, 16, generator=generator)
    y = torch.randint(0, 7, (16 * BATCHES_PER_EPOCH,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class DumpFull(Callback):
    """At fit end, every rank writes the whole masks and weights (gathered) to ``rank<r>.pt``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback))
        masks = {name: callback.masks.full_mask(name) for name in callback.masks.params}
        weights = {name: p.full_tensor().detach().cpu() for name, p in pl_module.named_parameters()}
        densities = callback.layer_densities(trainer.global_step)
        budget = {name: expected_kept(callback, name, densities[name]) for name in masks}
        if callback.distribution == "global":
            total = sum(m.numel() for m in masks.values())
            budget = {"total": round(callback.target_density(trainer.global_step) * total)}
        state = {"masks": masks, "weights": weights, "checked": getattr(callback, "checked", 0),
                 "traffic": getattr(callback, "traffic", None), "density": callback.masks.global_density(),
                 "budget": budget}
        torch.save(state, self.root / f"rank{trainer.global_rank}.pt")


def fit(callbacks: list[Callback], root: Path, epochs: int = 2, ckpt_path: str | None = None,
        dump: type[DumpFull] = DumpFull, model: pl.LightningModule | None = None, world: int = 2, **kwargs) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=world,
        strategy=ForkedModelParallel(data_parallel_size=world, tensor_parallel_size=1),
        max_epochs=epochs, callbacks=[*callbacks, dump(root)], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, **kwargs,
    )
    trainer.fit(model or sharded_model(), data(), ckpt_path=ckpt_path)


def results(root: Path) -> list[dict]:
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
