"""Test accuracy of every algorithm on Fashion-MNIST (SmallCNN, same epochs), at each density, in one run.

    python benchmarks/quality.py --epochs 3 --densities 0.1 0.02

Rows: dense; static sparse (ERK random mask, never updated); GMP (MagnitudePruning, ERK, cubic ramp over the
first 60% of steps); SET, RigL, SNFS, MEST (presets, ERK); RigL with ``scale_init=True``, and with
``configs/rigl.yaml``'s settings; Spartan (global budget, sharpness 20 as in the reference, and 200 for the
SmallCNN's weight scale; mask frozen for the last 20%); TopKAST (ERK, backward density 2x forward). Later
algorithms register more rows in ``VARIANTS``.
Prints a Markdown table for docs/BENCHMARKS.md. Every run uses the same seed, data order, model and epochs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sparse.callbacks import (
    MEST,
    SET,
    SNFS,
    DynamicSparseTraining,
    MagnitudePruning,
    RigL,
    SparsityScheduler,
    Spartan,
    TopKAST,
)
from lightning_sparse.data import FashionMNISTDataModule
from lightning_sparse.models import SmallCNN


def gmp(density: float) -> list[Callback]:
    return [SparsityScheduler(density=density, start=0, end=0.6), MagnitudePruning(update_every=50,
                                                                                  distribution="erk")]


VARIANTS: dict[str, Callable[[float], list[Callback]]] = {
    "static (ERK)": lambda d: [DynamicSparseTraining(density=d, update_every=None)],
    "GMP": gmp,
    "SET": lambda d: [SET(density=d)],
    "RigL": lambda d: [RigL(density=d)],
    "RigL (scale_init)": lambda d: [RigL(density=d, scale_init=True)],
    "RigL (configs/rigl.yaml: ER, scale_init, optimizer_state keep)": lambda d: [
        RigL(density=d, distribution="er", scale_init=True, optimizer_state="keep")
    ],
    "SNFS": lambda d: [SNFS(density=d)],
    "MEST": lambda d: [MEST(density=d)],
    "Spartan": lambda d: [Spartan(density=d, sharpness=20.0, distribution="global", freeze_at=0.8)],
    "Spartan (sharpness 200)": lambda d: [Spartan(density=d, sharpness=200.0, distribution="global", freeze_at=0.8)],
    "TopKAST": lambda d: [TopKAST(density=d, backward_density=min(1.0, 2 * d), distribution="erk", update_every=10)],
}


def train_and_test(callbacks: list[Callback], epochs: int, data_dir: str, limit_train: int | None) -> float:
    pl.seed_everything(0, verbose=False)
    data = FashionMNISTDataModule(data_dir=data_dir, batch_size=128, limit_train=limit_train)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
    )
    model = SmallCNN(lr=0.002)
    trainer.fit(model, datamodule=data)
    return trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02])
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=None, help="subsample the training set (quick checks)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.time()
    dense = train_and_test([], args.epochs, args.data_dir, args.limit_train)
    print(f"dense: {dense:.4f}", flush=True)
    names = args.only or list(VARIANTS)
    results = {}
    for name in names:
        for density in args.densities:
            results[name, density] = train_and_test(VARIANTS[name](density), args.epochs, args.data_dir,
                                                    args.limit_train)
            print(f"{name} @ {density}: {results[name, density]:.4f}", flush=True)
    header = " | ".join(f"density {d}" for d in args.densities)
    print(f"\n{args.epochs} epochs, SmallCNN, Fashion-MNIST test accuracy ({time.time() - started:.0f} s)\n")
    print(f"| method | {header} |\n|---|" + "---|" * len(args.densities))
    print("| dense | " + " | ".join(f"{dense:.4f}" for _ in args.densities) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[name, d]:.4f}" for d in args.densities) + " |")


if __name__ == "__main__":
    main()
