"""Test accuracy of every algorithm on Fashion-MNIST (SmallCNN, same epochs), at each density, in one run.

    python benchmarks/quality.py --epochs 3 --densities 0.1 0.02

Rows: dense; static sparse (ERK random mask, never updated); GMP (MagnitudePruning, ERK, cubic ramp over the
first 60% of steps); SET, RigL, SNFS, MEST (presets, ERK); RigL with ``scale_init=True``, and with
``configs/rigl.yaml``'s settings; Spartan (global budget, sharpness 20 as in the reference, and 200 for the
SmallCNN's weight scale; mask frozen for the last 20%); TopKAST (ERK, backward density 2x forward). Later
algorithms register more rows in ``VARIANTS``.
Prints a Markdown table for docs/BENCHMARKS.md and draws it to ``--plot`` (default
``docs/img/accuracy_vs_density.png``: one line per method, dense as a dashed line). Every run uses the same seed,
data order, model and epochs. ``--replay docs/BENCHMARKS.md`` trains nothing: it reads the first ``| method |
density ...`` table of that file and draws it::

    python benchmarks/quality.py --replay docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

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
from lightning_sparse.plots import accuracy_figure

PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "accuracy_vs_density.png"


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


def read_table(markdown: str) -> tuple[float, dict[str, dict[float, float]]]:
    """The dense accuracy and ``{method: {density: accuracy}}`` of the first ``| method | density ...`` table in
    ``markdown`` (the table :func:`print_table` prints; bold and footnote marks are dropped).

    Raises:
        ValueError: when there is no such table, or it has no dense row.
    """
    found = re.search(r"^\| method \|(.*)\|\n\|[-|]+\|\n((?:\|.*\|\n?)+)", markdown, flags=re.MULTILINE)
    if found is None:
        raise ValueError("markdown holds no '| method | density ... |' table")
    densities = [float(cell.split()[-1]) for cell in found.group(1).split("|")]
    accuracy = {}
    for line in found.group(2).strip().splitlines():
        name, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.sub(r"[`*†‡]", "", name).strip()
        accuracy[name] = {d: float(cell.strip("*")) for d, cell in zip(densities, cells, strict=True)}
    if "dense" not in accuracy:
        raise ValueError(f"the table has no dense row, got rows {list(accuracy)}")
    return next(iter(accuracy.pop("dense").values())), accuracy


def print_table(epochs: int, densities: list[float], dense: float, results: dict[str, dict[float, float]],
                seconds: float) -> None:
    """The Markdown table for docs/BENCHMARKS.md."""
    header = " | ".join(f"density {d}" for d in densities)
    print(f"\n{epochs} epochs, SmallCNN, Fashion-MNIST test accuracy ({seconds:.0f} s)\n")
    print(f"| method | {header} |\n|---|" + "---|" * len(densities))
    print("| dense | " + " | ".join(f"{dense:.4f}" for _ in densities) + " |")
    for name, points in results.items():
        print(f"| {name} | " + " | ".join(f"{points[d]:.4f}" for d in densities) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02])
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=None, help="subsample the training set (quick checks)")
    parser.add_argument("--plot", type=Path, default=PLOT, help="the PNG to draw the table to")
    parser.add_argument("--replay", type=Path, default=None, help="draw the table of this Markdown file, train nothing")
    args = parser.parse_args()
    if args.replay is not None:
        dense, results = read_table(args.replay.read_text())
        accuracy_figure(results, dense, args.plot, title=f"test accuracy vs density ({args.replay.name})")
        print(f"wrote {args.plot} ({len(results)} methods from {args.replay})")
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.time()
    dense = train_and_test([], args.epochs, args.data_dir, args.limit_train)
    print(f"dense: {dense:.4f}", flush=True)
    results: dict[str, dict[float, float]] = {}
    for name in args.only or list(VARIANTS):
        for density in args.densities:
            accuracy = train_and_test(VARIANTS[name](density), args.epochs, args.data_dir, args.limit_train)
            results.setdefault(name, {})[density] = accuracy
            print(f"{name} @ {density}: {accuracy:.4f}", flush=True)
    print_table(args.epochs, args.densities, dense, results, time.time() - started)
    accuracy_figure(results, dense, args.plot, title=f"Fashion-MNIST, SmallCNN, {args.epochs} epochs")
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
