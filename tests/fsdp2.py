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
    """3 Linear layers with ``hidden`` (40), 24 and 7 rows (the last split 4 + 3 over 2 ranks), each
    ``fully_shard`` ed."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 24), nn.ReLU())
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


def sharded_model(hidden: int = 40) -> ShardedNet:
    torch.manual_seed(0)
    return ShardedNet(hidden)


def data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16 * BATCHES_PER_EPOCH, 16, generator=generator)
    y = torch.randint(0, 7, (16 * BATCHES_PER_EPOCH,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on the CPU (gathered from every shard of a DTensor: every rank must call it)."""
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu().clone()


class DumpFull(Callback):
    """At fit end, every rank writes the whole masks and weights (gathered) to ``rank<r>.pt``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback))
        masks = {name: callback.masks.full_mask(name) for name in callback.masks.params}
        weights = {name: whole(p) for name, p in pl_module.named_parameters()}
        densities = callback.layer_densities(trainer.global_step)
        budget = {name: expected_kept(callback, name, densities[name]) for name in masks}
        if callback.distribution == "global":
            total = sum(m.numel() for m in masks.values())
            budget = {"total": round(callback.target_density(trainer.global_step) * total)}
        state = {"masks": masks, "weights": weights, "checked": getattr(callback, "checked", 0),
                 "traffic": getattr(callback, "traffic", None), "updates": getattr(callback, "updates", None),
                 "density": callback.masks.global_density(),
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


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(24, 32), nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class BlockNet(ShardedNet):
    """An embedding Linear, a list of 2 residual blocks (each ``fully_shard`` ed as a unit, as FSDP2 users wrap
    transformer blocks) and a head."""

    def __init__(self) -> None:
        super().__init__()
        del self.body
        self.embed, self.blocks = nn.Linear(16, 24), nn.ModuleList(Block() for _ in range(2))

    def configure_model(self) -> None:
        for block in self.blocks:
            fully_shard(block)
        fully_shard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class PlainBlockNet(BlockNet):
    def configure_model(self) -> None:
        pass


def block_model() -> BlockNet:
    torch.manual_seed(0)
    return BlockNet()


class PlainNet(ShardedNet):
    """The same model, not sharded (one device)."""

    def configure_model(self) -> None:
        pass


class DumpAtTrainStart(Callback):
    """At train start (after the sparsity callback restored its state), rank 0 writes the whole masks and weights
    to ``start.pt``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback))
        masks = {name: callback.masks.full_mask(name) for name in callback.masks.params}
        weights = {name: whole(p) for name, p in pl_module.named_parameters()}
        if trainer.global_rank == 0:
            torch.save({"masks": masks, "weights": weights}, self.root / "start.pt")


def fit_one_device(callbacks: list[Callback], root: Path, epochs: int = 2, ckpt_path: str | None = None,
                   **kwargs) -> None:
    """The same run on one CPU process, the model unsharded."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[*callbacks, DumpFull(root)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs,
    )
    torch.manual_seed(0)
    trainer.fit(PlainNet(), data(), ckpt_path=ckpt_path)


def results_one_device(root: Path) -> dict:
    return torch.load(root / "rank0.pt", weights_only=True)
