"""The whole SmallCNN on the CPU at 10% density: dense vs its exported sparse model, measured side by side in one run.

1. Train and prune: GMP on Fashion-MNIST as in ``configs/gmp_bsr_export.yaml`` (cubic ramp to density 0.1 over the
   first 60% of the steps, pruned every 25 steps): ``features.3`` (the 32 -> 64 3x3 conv) in ``"64x9"`` blocks of
   its ``(64, 288)`` matrix view, i.e. whole input channels, and ``classifier.1`` (3136 -> 128) in 32x32 blocks.
   ``features.0`` (288 weights) and ``classifier.3`` stay dense. Prints the test accuracy.
2. Export with pattern 32x32 (verified on a real batch) and ``load_sparse`` it: ``features.3`` becomes a
   ``SparseConv2d``, ``classifier.1`` a ``SparseLinear``.
3. Time, at batch 128 and 256 and 1 and 2 threads, with ``lightning_sparse.kernels.timing.time_calls`` (candidates
   alternate in rounds, medians): the two converted layers on their real inputs (sparse vs dense) and the whole
   model, NCHW as trained, and both models again in channels_last (dense channels_last vs sparse channels_last),
   since torch's CPU max-pool is several times faster in channels_last than on NCHW tensors.

Run: ``python benchmarks/cnn_cpu.py`` (``--epochs 1`` for a quicker, less accurate model; ``--conv-pattern 32x9``
to trade speed for accuracy; ``--from-export DIR`` to time an earlier run's export without training). Ratios are
dense time over sparse time (> 1: the sparse model is faster).
"""

from __future__ import annotations

import argparse
import copy
import time

import lightning.pytorch as pl
import torch
from safetensors.torch import load_model
from torch import nn

from lightning_sparse.callbacks import MagnitudePruning, SparsityScheduler
from lightning_sparse.data import FashionMNISTDataModule
from lightning_sparse.export import export_sparse, load_sparse
from lightning_sparse.export.manifest import MODEL_FILE
from lightning_sparse.kernels.timing import time_calls
from lightning_sparse.models import SmallCNN

LAYERS = ("features.3", "classifier.1")


def train_pruned(epochs: int, conv_pattern: str, data: FashionMNISTDataModule) -> SmallCNN:
    """GMP to 10% (conv in ``conv_pattern`` blocks, the big Linear in 32x32 blocks); prints the test accuracy."""
    pl.seed_everything(0, verbose=False)
    callbacks = [
        SparsityScheduler(density=0.1, start=0, end=0.6, shape="cubic"),
        MagnitudePruning(pattern=conv_pattern, include=["features.3.weight"], update_every=25),
        MagnitudePruning(pattern="32x32", include=["classifier.1.weight"], update_every=25),
    ]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    model = SmallCNN(lr=0.002)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    print(f"GMP {trainer.global_step} steps ({epochs} epochs), features.3 {conv_pattern}: test accuracy {accuracy:.4f}")
    return model.eval()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each of :data:`LAYERS` sees on batch ``x``."""
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n in LAYERS
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def ratio(times: dict[str, float], dense: str, sparse: str) -> str:
    return f"{times[dense] / times[sparse]:.2f}x"


@torch.inference_mode()
def measure(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, rep_ms: float) -> str:
    """One table row: per-layer and whole-model ratios for batch ``x`` at the current thread count."""
    cl = torch.channels_last
    dense_cl, sparse_cl = copy.deepcopy(dense).to(memory_format=cl), copy.deepcopy(sparse).to(memory_format=cl)
    models = {"dense": dense, "sparse": sparse, "dense cl": dense_cl, "sparse cl": sparse_cl}
    for name in ("sparse", "sparse cl"):
        torch.testing.assert_close(models[name](x), dense(x), rtol=1e-4, atol=1e-4)
    inputs = layer_inputs(dense, x)
    cells = []
    for n in LAYERS:  # each group timed on its own: time_calls runs rounds until its fastest candidate had rep_ms
        fns = {kind: (lambda m=m, n=n: m.get_submodule(n)(inputs[n])) for kind, m in (("d", dense), ("s", sparse))}
        cells.append(ratio(time_calls(fns, "cpu", warmup=100.0, rep=rep_ms), "d", "s"))
    times = time_calls({name: (lambda m=m: m(x)) for name, m in models.items()}, "cpu", warmup=100.0, rep=rep_ms)
    cells += [f"{times['dense']:.1f} ms", ratio(times, "dense", "sparse"), ratio(times, "dense cl", "sparse cl")]
    cells.append(ratio(times, "dense", "sparse cl"))
    return " | ".join([str(torch.get_num_threads()), str(x.shape[0]), *cells])


def load_export(path: str) -> tuple[nn.Module, nn.Module]:
    """The dense-with-zeros model (``model.safetensors``) and the sparse model of an export directory."""
    dense = SmallCNN()
    load_model(dense, f"{path}/{MODEL_FILE}", strict=True)
    return dense.eval(), load_sparse(path, SmallCNN()).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--conv-pattern", default="64x9", help='blocks of features.3 (default "64x9": input channels)')
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rep", type=float, default=1000.0, help="milliseconds of timed calls per candidate")
    parser.add_argument("--out", default="/tmp/cnn_cpu_export", help="where the trained model is exported")
    parser.add_argument("--from-export", default=None, help="time an earlier run's export instead of training")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128)
    if args.from_export is None:
        model = train_pruned(args.epochs, args.conv_pattern, data)
        batch = next(iter(data.test_dataloader()))[0]
        print(export_sparse(model, args.out, pattern="32x32", example_input=batch).summary())
    data.setup("test")
    images = torch.cat([batch[0] for _, batch in zip(range(2), data.test_dataloader(), strict=False)])
    dense, sparse = load_export(args.from_export or args.out)
    print({name: type(sparse.get_submodule(name)).__name__ for name in LAYERS})
    print(f"\nspeedup over dense (torch {torch.__version__}); whole-model columns: dense time, sparse vs dense (NCHW),")
    print("sparse channels_last vs dense channels_last, sparse channels_last vs dense NCHW")
    print("threads | batch | features.3 (conv) | classifier.1 | dense model | whole model | whole (cl) | cl vs NCHW")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            print(measure(dense, sparse, images[:batch], args.rep), flush=True)
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
