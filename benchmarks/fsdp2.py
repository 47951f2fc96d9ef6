"""FSDP2 cost of the sparsity callbacks: per-rank state memory, step time, and traffic per mask update.

    python benchmarks/fsdp2.py --width 1024 --steps 60

Trains an MLP (``--layers`` Linear layers of ``--width``, each ``fully_shard`` ed) on 2 CPU ranks (gloo) under
Lightning's ``ModelParallelStrategy`` with AdamW: dense, ``MagnitudePruning`` (GMP to 10%, ERK-free uniform, update
every 10 steps), ``NMSparsity`` (2:4), and the masked forwards: ``TopKAST`` (10% forward, 20% backward, update every
10 steps), ``Spartan`` (10%, its reference schedule: a solve every step, frozen from 80%) and ``Supermask`` (10% of
16x16 tiles, every step), one after the other in one run. Per rank: the bytes of the persistent state (local
parameter shards, gradients, AdamW moments, and the callback's own tensors: masks, backward masks, frozen values and
the masked forwards' dense rows kept aside while the shards hold the effective weights, at their largest over the
steps; Supermask's tile scores are parameters), the peak resident memory of the process, the median step time; per
mask update, the elements passed to collectives by the selection, and per optimizer step those passed outside it
(Spartan's gradient term). Prints ratios to dense.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_sparse.callbacks import (
    SET,
    SNFS,
    MagnitudePruning,
    NMSparsity,
    RigL,
    SparseGPT,
    SparsityScheduler,
    Spartan,
    Supermask,
    TopKAST,
)
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.distributed import TRAFFIC, local


class _Launcher(_MultiProcessingLauncher):
    def _recover_results_in_main_process(self, worker_output: Any, trainer: pl.Trainer) -> None:
        """Each rank writes its numbers; nothing to bring back."""


class _Forked(ModelParallelStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = _Launcher(self, start_method="fork")


class MLP(pl.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])

    def configure_model(self) -> None:
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # through the root: FSDP2 needs its forward first
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = local(t)
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _callback_tensors(callback: SparsityCallback | None) -> list:
    """The tensors a sparsity callback keeps besides the model's parameters (on this rank)."""
    if callback is None:
        return []
    tensors = [*callback.masks.masks.values(), *callback.masks._multipliers.values()]
    tensors += [*getattr(callback, "backward_masks", {}).values(), *getattr(callback, "_backward_multipliers",
                                                                              {}).values()]
    tensors += [*(getattr(callback, "_frozen", None) or {}).values()]
    tensors += [*(getattr(callback, "momentum", None) or {}).values(), *(getattr(callback, "_grads", None) or {})
                .values()]
    sharded = getattr(callback, "_sharded", None)
    return tensors + ([] if sharded is None else list(sharded.dense.values()))


class Measure(pl.Callback):
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name, self.times, self.start = root, name, [], 0.0
        self.traffic = 0

    def on_fit_start(self, *args: Any) -> None:  # before the callbacks' first update (at train start)
        self.traffic = TRAFFIC["elements"]

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)
        callback = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback)), None)
        self.callback_bytes = max(getattr(self, "callback_bytes", 0), _storage_bytes(_callback_tensors(callback)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.parameters())
        optimizer = trainer.optimizers[0]
        moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
        callback = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback)), None)
        updates = getattr(callback, "updates", 0)
        outside = TRAFFIC["elements"] - self.traffic - getattr(callback, "_moved", 0)
        row = {
            "params": _storage_bytes(params), "grads": _storage_bytes(p.grad for p in params if p.grad is not None),
            "moments": _storage_bytes(moments), "masks": self.callback_bytes,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_ms": 1e3 * statistics.median(self.times[5:] or self.times),
            "traffic": getattr(callback, "traffic_per_update", None),
            "step_traffic": outside / trainer.global_step if updates else None,
        }
        (self.root / f"{self.name}-rank{trainer.global_rank}.json").write_text(json.dumps(row))


class _Counting:
    """Mixin: elements passed to collectives per mask update."""

    updates = 0

    def update_masks(self, trainer, pl_module, step):
        before = TRAFFIC["elements"]
        changed = super().update_masks(trainer, pl_module, step)
        self.updates += 1
        self._moved = getattr(self, "_moved", 0) + TRAFFIC["elements"] - before
        self.traffic_per_update = self._moved / self.updates
        return changed


class CountedPruning(_Counting, MagnitudePruning):
    pass


class CountedNM(_Counting, NMSparsity):
    pass


class CountedTopKAST(_Counting, TopKAST):
    pass


class CountedSpartan(_Counting, Spartan):
    pass


class CountedSupermask(_Counting, Supermask):
    pass


class CountedRigL(_Counting, RigL):
    pass


class CountedSET(_Counting, SET):
    pass


class CountedSNFS(_Counting, SNFS):
    pass


class CountedSparseGPT(_Counting, SparseGPT):
    pass


def run(name: str, callbacks: list, args: argparse.Namespace, root: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(args.steps * 16, args.width)),
                                       batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=_Forked(data_parallel_size=2, tensor_parallel_size=1),
                         max_steps=args.steps, callbacks=[*callbacks, Measure(root, name)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MLP(args.width, args.layers), data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    runs = {
        "dense": [],
        "MagnitudePruning 10%": [SparsityScheduler(density=0.1, end=0.5), CountedPruning(update_every=10)],
        "NMSparsity 2:4": [CountedNM(n=2, m=4, at_step=0, reselect_every=10)],
        "TopKAST 10% (backward 20%)": [CountedTopKAST(density=0.1, backward_density=0.2, update_every=10)],
        "Spartan 10%": [CountedSpartan(density=0.1, sharpness=200.0)],
        "Supermask 10% of 16x16": [CountedSupermask(density=0.1, tile_size=16)],
        "RigL 10%": [CountedRigL(density=0.1, update_every=10)],
        "SET 10%": [CountedSET(density=0.1, update_every=10)],
        "SNFS 10%": [CountedSNFS(density=0.1, update_every=10)],
        "SparseGPT 2:4 at step 20": [CountedSparseGPT(nm="2:4", at=20, calibration_batches=4)],
    }
    for name, callbacks in runs.items():
        run(name, callbacks, args, root)
    rows = {name: [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in (0, 1)] for name in runs}
    dense = rows["dense"][0]
    dense_state = dense["params"] + dense["grads"] + dense["moments"]
    print(f"MLP {args.layers} x Linear({args.width}, {args.width}), 2 ranks, {args.steps} steps, AdamW\n")
    print("| run | state per rank (MB) | vs dense | callback tensors (MB) | max RSS vs dense | step time vs dense | "
          "collective elements per mask update | per step besides |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (rank0, _) in rows.items():
        state = rank0["params"] + rank0["grads"] + rank0["moments"] + rank0["masks"]
        traffic, step = (rank0[key] if rank0[key] is not None else "-" for key in ("traffic", "step_traffic"))
        print(f"| {name} | {state / 2**20:.2f} | {state / dense_state:.3f}x | {rank0['masks'] / 2**20:.2f} | "
              f"{rank0['max_rss'] / dense['max_rss']:.3f}x | {rank0['step_ms'] / dense['step_ms']:.2f}x | "
              f"{traffic if isinstance(traffic, str) else f'{traffic:.0f}'} | "
              f"{step if isinstance(step, str) else f'{step:.1f}'} |")


if __name__ == "__main__":
    main()
