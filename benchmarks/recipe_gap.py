"""Test accuracy of a recipe against its dense baseline over several seeds, side by side in one run.

    python benchmarks/recipe_gap.py --config configs/rigl.yaml --epochs 12 --seeds 0 1 2
    python benchmarks/recipe_gap.py --config configs/spartan.yaml --sparse-only --seeds 0

For each seed: the recipe as its YAML gives it (model, data, ``schedule``, ``sparsity`` and the other callbacks with
their arguments; the recipe's ``ModelCheckpoint`` left out), with
``seed_everything(seed)`` and every callback that takes a ``seed`` given that seed too; and the dense baseline: the
same model, data, epochs and seed with no sparsity callbacks (what ``configs/dense.yaml`` is to the 4-epoch recipes).
``--epochs`` overrides the YAML's ``max_epochs`` for both. Prints each run as it ends, then a Markdown table of the
accuracies, the per-seed gaps (recipe - dense, in points) and their means. With seed 0 and the YAML's epochs, the
recipe's number equals ``lightning-sparse fit --config <config>``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
import yaml


def instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    """``class_path(**init_args, **overrides)``; overrides the class does not take are left out."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    accepted = inspect.signature(cls).parameters
    return cls(**spec.get("init_args", {}), **{k: v for k, v in overrides.items() if k in accepted})


def build(config: dict[str, Any], seed: int, sparse: bool) -> tuple[pl.LightningModule, pl.LightningDataModule, list]:
    """The model, data and callbacks of ``config`` (no callbacks for the dense baseline), after seeding."""
    pl.seed_everything(seed, verbose=False)
    data = instantiate(config["data"])
    model = instantiate(config["model"])
    listed = [c for c in config["trainer"].get("callbacks", []) if not c["class_path"].endswith(".ModelCheckpoint")]
    specs = [config[key] for key in ("schedule", "sparsity") if config.get(key)] + listed  # the CLI's order
    callbacks = [instantiate(c, seed=seed) for c in specs] if sparse else []
    return model, data, callbacks


def run(config: dict[str, Any], seed: int, sparse: bool, epochs: int) -> float:
    """Test accuracy of one training run."""
    model, data, callbacks = build(config, seed, sparse)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe YAML of configs/")
    parser.add_argument("--epochs", type=int, default=None, help="override the YAML's trainer.max_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparse-only", action="store_true", help="skip the dense baseline runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    epochs = args.epochs or config["trainer"]["max_epochs"]
    kinds = ["recipe"] if args.sparse_only else ["dense", "recipe"]
    accuracy: dict[str, list[float]] = {kind: [] for kind in kinds}
    for seed in args.seeds:
        for kind in kinds:
            start = time.time()
            accuracy[kind].append(run(config, seed, kind == "recipe", epochs))
            print(f"{kind} seed {seed}: test accuracy {accuracy[kind][-1]:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    print(f"\n{args.config}, {epochs} epochs, torch {torch.__version__}, {args.threads} threads\n")
    print_table(args.seeds, accuracy)


def print_table(seeds: list[int], accuracy: dict[str, list[float]]) -> None:
    """Accuracy per seed and mean; with a dense row, the recipe's gap to it in points."""
    print("| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for kind, values in accuracy.items():
        print(f"| {kind} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.mean(values):.4f} |")
    if "dense" in accuracy:
        gaps = [100 * (r - d) for r, d in zip(accuracy["recipe"], accuracy["dense"], strict=True)]
        print("| gap (points) | " + " | ".join(f"{g:+.2f}" for g in gaps) + f" | {statistics.mean(gaps):+.2f} |")


if __name__ == "__main__":
    main()
