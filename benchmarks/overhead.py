"""Per-step training overhead of sparsity callbacks, as ratios to a dense step, measured side by side.

Models (``--model``): ``mlp``, a 784-1024-1024-10 MLP at batch 256 (Adam; 1.9M weights and little compute per
weight: the worst case for per-weight mask work), or ``cnn``, the recipes' SmallCNN at their batch of 128 (Adam,
cosine schedule; 420k weights, most of the compute in the convolutions); synthetic inputs of Fashion-MNIST's shape
either way. Variants run in
interleaved rounds in one process so machine noise hits all of them alike; each round trains every variant for
``--steps`` optimizer steps and the first ``--warmup`` steps of each round are dropped.

The ratio is *amortized*: the time from the start of step ``--warmup`` to the end of the last step (every hook,
mask update and epoch boundary in between) divided by the number of steps, so an update every 100 steps counts
with its full cost (the default 205 steps leave a window of 200 steps). The median step is printed too: it shows
the cost of an ordinary step without the updates. ``hooks`` is the clock time spent inside the sparsity callbacks'
own hooks per step (same window), and ``dense+hooks`` the dense step plus that time, over the dense step: for
callbacks that leave the forward and backward alone (MagnitudePruning, RigL) it is their whole cost, free of the
run-to-run noise that separate step times carry (+-5-10 % on a shared machine); Spartan, TopKAST and ModelPruning
also cost time in the forward and backward, which only the end-to-end ratios show. The last line pairs each round's
variant with the dense run just before it and gives the median of those ratios (it cancels drift slower than a
round).

    python benchmarks/overhead.py --rounds 3                 # CPU time of the training thread
    python benchmarks/overhead.py --rounds 3 --model cnn     # the recipes' SmallCNN
    python benchmarks/overhead.py --rounds 3 --clock wall --threads 2

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
from lightning_sparse.models import SmallCNN


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
    """Clock readings at every batch start and end (forward, backward, optimizer step and every callback hook)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(self.clock())

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(self.clock())

    def step_times(self, warmup: int) -> list[float]:
        """Duration of each step from ``warmup`` on."""
        return [end - start for start, end in zip(self.starts[warmup:], self.ends[warmup:], strict=True)]

    def amortized(self, warmup: int) -> float:
        """Time from the start of step ``warmup`` to the end of the last step, per step."""
        return (self.ends[-1] - self.starts[warmup]) / (len(self.ends) - warmup)


class HookTimer:
    """Clock time spent inside the hooks of the given callbacks, per outermost call (the ``hooks`` column of the
    module docstring)."""

    HOOKS = tuple(name for name in dir(Callback) if name.startswith("on_"))

    def __init__(self, callbacks: list[Callback], clock: Callable[[], float]) -> None:
        self.clock = clock
        self.calls: list[tuple[float, float]] = []  # (start, duration) of each outermost hook call
        self._depth = 0
        for callback in callbacks:
            for name in self.HOOKS:
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._depth += 1
            start = self.clock()
            try:
                return hook(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.calls.append((start, self.clock() - start))

        return timed

    def per_step(self, timer: StepTimer, warmup: int) -> float:
        """Hook time inside :meth:`StepTimer.amortized`'s window, per step."""
        begin, end = timer.starts[warmup], timer.ends[-1]
        return sum(d for start, d in self.calls if begin <= start < end) / (len(timer.ends) - warmup)


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


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], int]] = {
    "mlp": (BenchMLP, 256),
    "cnn": (lambda: SmallCNN(lr=0.002), 128),
}


def data(steps: int, batch_size: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch_size, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def run_variant(
    make: Callable[[], list[Callback]], model: str, steps: int, epochs: int, clock: Callable[[], float]
) -> tuple[StepTimer, HookTimer]:
    timer = StepTimer(clock)
    torch.manual_seed(0)
    callbacks = make()
    hooks = HookTimer(callbacks, clock)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[*callbacks, timer], accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    module, batch_size = MODELS[model]
    trainer.fit(module(), data(steps // epochs, batch_size))
    return timer, hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=205, help="optimizer steps per variant per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per round (ModelPruning prunes per epoch)")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
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
    steps = {name: [] for name in names}
    amortized = {name: [] for name in names}
    hooks = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            timer, hook_timer = run_variant(VARIANTS[name], args.model, args.steps, args.epochs, clock)
            steps[name] += timer.step_times(args.warmup)
            amortized[name].append(timer.amortized(args.warmup))
            hooks[name].append(hook_timer.per_step(timer, args.warmup))
    print(f"model {args.model}, torch {torch.__version__}, {args.clock} clock, {threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps ({args.warmup} warm-up steps dropped per round)")
    print_table(names, *({n: statistics.median(v) for n, v in d.items()} for d in (amortized, steps, hooks)))
    if "dense" in amortized and args.rounds > 1:
        paired = {n: statistics.median(paired_ratios(amortized[n], amortized["dense"])) for n in names}
        print("amortized ratio to the dense run of the same round, median over rounds (cancels slow drift): "
              + ", ".join(f"{n} {r:.3f}" for n, r in paired.items() if n != "dense"))


def paired_ratios(variant: list[float], dense: list[float]) -> list[float]:
    """Per round, the variant's amortized step over the dense one measured just before it."""
    return [v / d for v, d in zip(variant, dense, strict=True)]


def print_table(names: list[str], amortized: dict[str, float], median: dict[str, float],
                hooks: dict[str, float]) -> None:
    """Amortized ms per step (median over rounds) and median step, each with its ratio to dense; the callbacks'
    hook time per step and ``(dense amortized + hook time) / dense amortized``."""
    print(f"{'variant':<44}{'amortized (ms)':>16}{'ratio':>8}{'median step (ms)':>18}{'ratio':>8}"
          f"{'hooks (ms)':>12}{'dense+hooks':>13}")
    for name in names:
        ratios = [f"{v[name] / v['dense']:.3f}" if "dense" in v else "-" for v in (amortized, median)]
        with_hooks = f"{1 + hooks[name] / amortized['dense']:.4f}" if "dense" in amortized else "-"
        print(f"{name:<44}{amortized[name] * 1e3:>16.2f}{ratios[0]:>8}{median[name] * 1e3:>18.2f}{ratios[1]:>8}"
              f"{hooks[name] * 1e3:>12.3f}{with_hooks:>13}")


if __name__ == "__main__":
    main()
