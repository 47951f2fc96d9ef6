"""Per-step training overhead of sparsity callbacks, as ratios to a dense step, measured side by side.

Model: a 784-1024-1024-10 MLP at batch 256 (Adam), synthetic inputs of Fashion-MNIST's shape. Variants run in
interleaved rounds in one process so machine noise hits all of them alike; each round trains every variant for
``--steps`` optimizer steps and the first ``--warmup`` steps of each round are dropped.

    python benchmarks/overhead.py --rounds 5 --steps 60                 # CPU time of the training thread
    python benchmarks/overhead.py --rounds 5 --steps 60 --clock wall --threads 2

The default clock is ``cpu``: ``time.thread_time()`` of the training thread with one intra-op thread, which does
not count time the thread waits for a core, so the ratios hold on a machine shared with other jobs. ``wall``
measures wall time with ``--threads`` intra-op threads (use it on an otherwise idle machine).

Variants: dense; MagnitudePruning (GMP to 10% density, cubic schedule, update every 100 steps); Spartan (10%,
one global soft top-k solved every step, masked forward); TopKAST (10% forward, 20% backward, update every 100
steps, masked forward); Lightning's built-in ``ModelPruning`` (L1 unstructured, forward pre-hooks, pruning every
epoch). Algorithms registered in
``VARIANTS`` by later work are measured the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from lightning_sparse.callbacks import MagnitudePruning, RigL, SparsityScheduler, Spartan, TopKAST


class BenchMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    """Time from batch start to batch end (forward, backward, optimizer step and every callback hook)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = self.clock()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(self.clock() - self._start)


def dense() -> list[Callback]:
    return []


def magnitude_pruning() -> list[Callback]:
    return [SparsityScheduler(density=0.1, start=0, end=0.75), MagnitudePruning(update_every=100)]


def spartan() -> list[Callback]:
    return [Spartan(density=0.1, distribution="global")]


def topkast() -> list[Callback]:
    return [TopKAST(density=0.1, backward_density=0.2, update_every=100)]


def lightning_model_pruning() -> list[Callback]:
    return [ModelPruning("l1_unstructured", amount=0.5, use_global_unstructured=False, verbose=0)]


VARIANTS: dict[str, Callable[[], list[Callback]]] = {
    "dense": dense,
    "MagnitudePruning": magnitude_pruning,
    "MagnitudePruning one-shot (10% from step 0)": lambda: [MagnitudePruning(density=0.1)],
    "RigL": lambda: [RigL(density=0.1, update_every=100)],
    "Spartan": spartan,
    "TopKAST": topkast,
    "Lightning ModelPruning": lightning_model_pruning,
}


def data(steps: int, batch_size: int = 256) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch_size, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def run_variant(make: Callable[[], list[Callback]], steps: int, epochs: int, clock: Callable[[], float]) -> list[float]:
    timer = StepTimer(clock)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[*make(), timer], accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(BenchMLP(), data(steps // epochs))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round (ModelPruning prunes per epoch)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: 1 for cpu, 2 for wall)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.clock == "cpu" else 2)
    if args.clock == "cpu" and threads != 1:
        parser.error("--clock cpu measures the training thread only: use --threads 1")
    torch.set_num_threads(threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    names = args.only or list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            step_times = run_variant(VARIANTS[name], args.steps, args.epochs, clock)
            times[name] += step_times[args.warmup:]
    dense_ms = statistics.median(times["dense"]) * 1e3 if "dense" in times else None
    print(f"torch {torch.__version__}, {args.clock} clock, {threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':<28}{'median step (ms)':>18}{'ratio to dense':>16}")
    for name in names:
        median_ms = statistics.median(times[name]) * 1e3
        ratio = f"{median_ms / dense_ms:.3f}" if dense_ms else "-"
        print(f"{name:<28}{median_ms:>18.2f}{ratio:>16}")


if __name__ == "__main__":
    main()
