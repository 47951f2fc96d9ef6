"""SparseGPT vs magnitude pruning on the tiny CharGPT (Python stdlib text), measured side by side in one run.

    python benchmarks/sparsegpt.py --save runs/chargpt.ckpt   # train 400 steps, prune copies of the model
    python benchmarks/sparsegpt.py --ckpt runs/chargpt.ckpt   # or start from a checkpoint of CharGPT
    python benchmarks/sparsegpt.py --hf [options]             # the Hugging Face Llama vs ModelOpt run (sparsegpt_hf.py)

For every Linear / attention projection of the model: the relative reconstruction error
``||W X - W' X||_F / ||W X||_F`` on held-out inputs X (the dense model's layer inputs on test-split batches never used
for calibration), and the validation perplexity, for magnitude 2:4 (the 2 largest |w| of every 4, no update),
SparseGPT 2:4 with the paper's per-weight N:M choice (``nm_selection="independent"``), with the default joint OBS
choice, and with ``refit=True, reselect=--reselect``; magnitude 50% and SparseGPT 50% (unstructured). Every method
prunes a copy of the same trained model with the same calibration batches. Prints a Markdown table and the project's
acceptance checks for each SparseGPT 2:4 variant: its error at most half of magnitude 2:4's on every layer, and its
perplexity increase over dense at most half of magnitude 2:4's.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import math
import pathlib
import sys
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_sparse.callbacks.sparsegpt import sparsegpt_
from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.obs import reconstruction_error
from lightning_sparse.core.patterns import NM
from lightning_sparse.data import PythonSourceDataModule
from lightning_sparse.layer_inputs import collect_hessians
from lightning_sparse.models import CharGPT
from lightning_sparse.targets import select_targets


def train(
    steps: int, batch_size: int, save: str | None, make_model=lambda: CharGPT(block_size=128)
) -> tuple[pl.LightningModule, PythonSourceDataModule]:
    """Train ``make_model()`` (seeded) for ``steps`` on the stdlib bytes; also used by ``sparsegpt_hf.py``."""
    pl.seed_everything(0, verbose=False)
    data = PythonSourceDataModule(block_size=128, batch_size=batch_size)
    model = make_model()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    if save:
        trainer.save_checkpoint(save)
    return model, data


@torch.no_grad()
def perplexity(model: pl.LightningModule, batches: list) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in batches]
    return math.exp(torch.stack(losses).mean())


@torch.no_grad()
def magnitude_(model: CharGPT, names: list[str], density: float | None = None) -> None:
    """Keep the largest |w| of each layer: 2 of every 4 inputs, or ``round(density * numel)``."""
    params = dict(model.named_parameters())
    for name in names:
        w = params[name]
        w.mul_(NM(2, 4).topk_mask(w.abs(), 0.5) if density is None else topk_mask(w.abs(), round(density * w.numel())))


def main() -> None:
    if "--hf" in sys.argv[1:]:  # the options after it are sparsegpt_hf.py's
        sys.argv.remove("--hf")
        spec = importlib.util.spec_from_file_location("benchmark_sparsegpt_hf", pathlib.Path(__file__).with_name(
            "sparsegpt_hf.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", action="store_true", help="run benchmarks/sparsegpt_hf.py instead (its options follow)")
    parser.add_argument("--steps", type=int, default=400, help="training steps when no --ckpt is given")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of CharGPT (skips training)")
    parser.add_argument("--save", default=None, help="write the trained model's checkpoint here (reuse with --ckpt)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--reselect", type=int, default=2, help="mask re-selection passes of the refined variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.ckpt:
        dense = CharGPT.load_from_checkpoint(args.ckpt, map_location="cpu")
        data = PythonSourceDataModule(block_size=dense.block_size, batch_size=args.batch_size)
    else:
        dense, data = train(args.steps, args.batch_size, args.save)
    data.setup()
    calibration = [x for x, _ in itertools.islice(data.train_dataloader(), args.calibration_batches)]
    heldout = list(itertools.islice(data.test_dataloader(), args.calibration_batches))
    val = list(itertools.islice(data.val_dataloader(), args.eval_batches))
    names = select_targets(dense)
    dense.eval()
    hessians = collect_hessians(dense, names, heldout, lambda model, batch: model(batch[0]))
    weights = dict(dense.named_parameters())
    refined = f"SparseGPT 2:4 refit+reselect {args.reselect}"
    methods = {
        "magnitude 2:4": lambda m: magnitude_(m, names),
        "SparseGPT 2:4 independent": lambda m: sparsegpt_(
            m, calibration, nm="2:4", nm_selection="independent", progress=False
        ),
        "SparseGPT 2:4": lambda m: sparsegpt_(m, calibration, nm="2:4", progress=False),
        refined: lambda m: sparsegpt_(m, calibration, nm="2:4", refit=True, reselect=args.reselect, progress=False),
        "magnitude 50%": lambda m: magnitude_(m, names, 0.5),
        "SparseGPT 50%": lambda m: sparsegpt_(m, calibration, density=0.5, progress=False),
    }
    errors, ppl = {}, {"dense": perplexity(dense, val)}
    for method, prune in methods.items():
        model, start = copy.deepcopy(dense), time.time()
        prune(model)
        seconds = time.time() - start
        pruned = dict(model.named_parameters())
        errors[method] = {n: reconstruction_error(weights[n], pruned[n], hessians[n]) for n in names}
        ppl[method] = perplexity(model, val)
        print(
            f"{method}: val ppl {ppl[method]:.3f} (pruning {seconds:.0f} s, {time.time() - started:.0f} s in all)",
            flush=True,
        )
    hp = dense.hparams
    print(
        f"\nCharGPT (dim {hp.dim}, depth {hp.depth}), relative reconstruction error on held-out inputs; "
        f"{args.calibration_batches} calibration batches of {args.batch_size}x128 tokens\n"
    )
    variants = [m for m in methods if m.startswith("SparseGPT 2:4")]
    print("| layer | " + " | ".join(methods) + " | " + " | ".join(f"{v} / magnitude 2:4" for v in variants) + " |")
    print("|---|" + "---|" * (len(methods) + len(variants)))
    for n in names:
        ratios = " | ".join(f"{errors[v][n] / errors['magnitude 2:4'][n]:.2f}" for v in variants)
        print(f"| {n} | " + " | ".join(f"{errors[m][n]:.4f}" for m in methods) + f" | {ratios} |")
    cells = " | ".join(f"{ppl[m]:.3f}" for m in methods)
    print(f"| **val perplexity** (dense {ppl['dense']:.3f}) | {cells} |" + " |" * len(variants))
    for v in variants:
        worst = max(errors[v][n] / errors["magnitude 2:4"][n] for n in names)
        increase = (ppl[v] - ppl["dense"]) / (ppl["magnitude 2:4"] - ppl["dense"])
        print(
            f"\n{v}: worst per-layer error ratio to magnitude 2:4 {worst:.2f} (target <= 0.5: {worst <= 0.5}); "
            f"perplexity increase ratio {increase:.2f} (target <= 0.5: {increase <= 0.5})"
        )
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
