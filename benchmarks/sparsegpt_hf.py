"""SparseGPT 2:4 vs NVIDIA ModelOpt's ``sparsegpt`` and magnitude 2:4 on a small Hugging Face Llama, in one run.

    pip install -c constraints.txt nvidia-modelopt             # the peer; not a dependency of lightning_sparse
    python benchmarks/sparsegpt_hf.py --save runs/llama.ckpt   # train --steps dense, then prune copies of the model
    python benchmarks/sparsegpt_hf.py --ckpt runs/llama.ckpt   # or start from that checkpoint (skips training)

The model is ``HFCausalLM`` around ``LlamaForCausalLM`` built from a config (hidden 128, MLP 344, 4 layers, 4 heads,
2 key-value heads, byte vocabulary), trained dense on the Python standard library's source. Every method prunes a
deep copy of the same trained model, calibrated on the same train batches given as Hugging Face dict batches
``{"input_ids": x}``:

* magnitude 2:4: the 2 largest |w| of every 4 consecutive inputs, no update;
* ModelOpt ``sparsegpt``: ``mts.sparsify(model, "sparsegpt", config={"data_loader": ..., "collect_func": ...})`` with
  its defaults (one pass of the dense model for the Hessians, ``hessian_damp=0.1``; it keeps only the mask, the
  OBS-updated weights are dropped), then ``mts.export``;
* ``sparsegpt_(model, batches, nm="2:4")`` with its defaults (sequential, joint N:M choice), with
  ``nm_selection="independent"``, with ``sequential=False`` (Hessians from one dense pass, like ModelOpt) and with
  ``sequential="blocks"`` (each block's Hessians from one pass of it over the pruned blocks before: the paper's order).

All prune the same weights, every ``nn.Linear`` inside the decoder layers (``lm_head`` stays dense; asserted). For each
weight: the relative output error ``||W X - W' X||_F / ||W X||_F`` on held-out inputs X (the dense model's layer inputs
on test-split batches never used for calibration); perplexity on val-split batches; the wall time of each pruning call
(``time.perf_counter``; ``--repeats`` rounds that each run every method in turn, all under
``torch.set_num_threads(--threads)``; the time ratio to ModelOpt is the median of the rounds' ratios, each of two calls
made one after the other; ModelOpt's ``mts.export`` is not timed). Prints a Markdown table and the
acceptance checks of issue 16 for each SparseGPT variant: error at most ModelOpt's on every layer, perplexity increase
at most half of magnitude 2:4's, wall time at most 1.5x ModelOpt's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import itertools
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lightning_sparse.calibration import default_forward
from lightning_sparse.callbacks.sparsegpt import sparsegpt_
from lightning_sparse.core.obs import reconstruction_error
from lightning_sparse.core.patterns import NM
from lightning_sparse.data import PythonSourceDataModule
from lightning_sparse.layer_inputs import collect_hessians
from lightning_sparse.models import HFCausalLM
from lightning_sparse.targets import select_targets

LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
PEER, BASELINE, OURS = "ModelOpt sparsegpt", "magnitude 2:4", "SparseGPT 2:4"


def _sibling(name: str):
    """A benchmark script next to this one, loaded by path (this folder is taken off ``sys.path`` in ``main``)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHARGPT = _sibling("sparsegpt")  # its training loop and perplexity, shared
perplexity = _CHARGPT.perplexity


def train(steps: int, batch_size: int, lr: float, save: str | None) -> tuple[HFCausalLM, PythonSourceDataModule]:
    return _CHARGPT.train(steps, batch_size, save, lambda: HFCausalLM(config=LLAMA, lr=lr,
                                                                      warmup_steps=min(50, steps // 10)))


@torch.no_grad()
def magnitude_(model: nn.Module, names: list[str]) -> None:
    """Keep the 2 largest |w| of every 4 consecutive inputs of each weight."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].mul_(NM(2, 4).topk_mask(params[name].abs(), 0.5))


def modelopt_(model: nn.Module, batches: list[Mapping[str, Tensor]]) -> nn.Module:
    """ModelOpt's ``sparsegpt`` mode with its default rules (2:4 on every ``nn.Linear`` but ``*lm_head*``) and search
    config, calibrated with ``model(**batch)`` on each batch; returns the exported (plain ``nn.Linear``) model."""
    import modelopt.torch.sparsity as mts  # the peer, installed only for this benchmark

    config = {"data_loader": batches, "collect_func": lambda batch: (batch,), "verbose": False}
    with contextlib.redirect_stdout(io.StringIO()):  # one "Searching for sparse mask ..." line per module
        model = mts.sparsify(model, "sparsegpt", config=config)
    return model


def export_modelopt(model: nn.Module) -> nn.Module:
    import modelopt.torch.sparsity as mts

    return mts.export(model)


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """At most ``n`` non-zeros in every ``m`` consecutive inputs (dim 1) of a ``(out, in)`` weight.

    >>> is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
    True
    >>> is_nm_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    False
    """
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= n).all())


def pruned_weights(dense: Mapping[str, Tensor], pruned: Mapping[str, Tensor]) -> set[str]:
    """Names of the parameters a method changed.

    Raises:
        ValueError: when a changed parameter is not 2:4 along its inputs.
    """
    changed = {name for name, value in dense.items() if not torch.equal(value, pruned[name])}
    bad = sorted(name for name in changed if pruned[name].dim() != 2 or not is_nm_sparse(pruned[name]))
    if bad:
        raise ValueError(f"changed but not 2:4 along the inputs: {bad}")
    return changed


def paired_ratios(times: Mapping[str, list[float]], method: str, peer: str = PEER) -> list[float]:
    """``method``'s wall time over ``peer``'s, round by round (the two ran one after the other in each round).

    >>> paired_ratios({"a": [2.0, 9.0], "b": [1.0, 3.0]}, "a", "b")
    [2.0, 3.0]
    """
    return [mine / theirs for mine, theirs in zip(times[method], times[peer], strict=True)]


def acceptance(
    errors: Mapping[str, Mapping[str, float]],
    ppl: Mapping[str, float],
    time_ratio: float,
    ours: str,
    peer: str = PEER,
    baseline: str = BASELINE,
) -> list[tuple[str, float, float, bool]]:
    """The three checks of issue 16 for method ``ours`` (``time_ratio``: its wall time over ``peer``'s):
    ``(what, measured ratio, target, passed)``.

    >>> errors = {"ours": {"a": 0.1, "b": 0.3}, "peer": {"a": 0.2, "b": 0.3}}
    >>> ppl = {"dense": 2.0, "ours": 2.5, "magnitude": 4.0}
    >>> [round(r, 2) for _, r, _, _ in acceptance(errors, ppl, 3.0, "ours", "peer", "magnitude")]
    [1.0, 0.25, 3.0]
    """
    worst = max(errors[ours][name] / errors[peer][name] for name in errors[ours])
    increase = (ppl[ours] - ppl["dense"]) / (ppl[baseline] - ppl["dense"])
    return [
        (f"worst per-layer error ratio to {peer}", worst, 1.0, worst <= 1.0),
        (f"perplexity increase ratio to {baseline}", increase, 0.5, increase <= 0.5),
        (f"wall time ratio to {peer} (median over rounds)", time_ratio, 1.5, time_ratio <= 1.5),
    ]


def timed_rounds(
    methods: Mapping[str, Callable[[nn.Module], object]], dense: nn.Module, rounds: int
) -> tuple[dict[str, nn.Module], dict[str, list[float]]]:
    """Each method prunes a fresh copy of ``dense`` in place (``prune`` may return the model, as ModelOpt does) once per
    round, the methods in turn within a round (so a change in the machine's load hits neighbours alike). Returns the
    last pruned copy and the wall times of each method's calls, round by round."""
    models, times = {}, {method: [] for method in methods}
    for _ in range(rounds):
        for method, prune in methods.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            result = prune(model)
            times[method].append(time.perf_counter() - start)
            models[method] = result if isinstance(result, nn.Module) else model
            print(f"{method}: pruned in {times[method][-1]:.2f} s", flush=True)
    return models, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps when no --ckpt is given")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the dense training")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of the HFCausalLM (skips training)")
    parser.add_argument("--save", default=None, help="write the trained model's checkpoint here (reuse with --ckpt)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed pruning calls, every method in each")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for every method")
    args = parser.parse_args()
    # This script's folder comes first on sys.path, and its kernels.py would shadow the `kernels` package that
    # transformers imports (HFCausalLM imports transformers when it builds the model).
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.ckpt:
        dense = HFCausalLM.load_from_checkpoint(args.ckpt, map_location="cpu")
        data = PythonSourceDataModule(block_size=128, batch_size=args.batch_size)
    else:
        dense, data = train(args.steps, args.batch_size, args.lr, args.save)
        print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    dense.eval()
    data.setup()
    calibration = [{"input_ids": x} for x, _ in itertools.islice(data.train_dataloader(), args.calibration_batches)]
    heldout = [{"input_ids": x} for x, _ in itertools.islice(data.test_dataloader(), args.calibration_batches)]
    val = list(itertools.islice(data.val_dataloader(), args.eval_batches))

    names = select_targets(dense)
    decoder = {f"{n}.weight" for n, m in dense.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    head = next(n for n, p in dense.named_parameters() if p is dense.get_output_embeddings().weight)
    assert set(names) == decoder and head not in names, (names, head)
    hessians = collect_hessians(dense, names, heldout, default_forward)
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}

    methods: dict[str, Callable[[nn.Module], object]] = {
        BASELINE: lambda m: magnitude_(m, names),
        PEER: lambda m: modelopt_(m, calibration),
        OURS: lambda m: sparsegpt_(m, calibration, nm="2:4", progress=False),
        f"{OURS} independent": lambda m: sparsegpt_(
            m, calibration, nm="2:4", nm_selection="independent", progress=False
        ),
        f"{OURS} one pass": lambda m: sparsegpt_(m, calibration, nm="2:4", sequential=False, progress=False),
        f"{OURS} blocks": lambda m: sparsegpt_(m, calibration, nm="2:4", sequential="blocks", progress=False),
    }
    importlib.import_module("modelopt.torch.sparsity")  # imported before the clock starts, like lightning_sparse
    models, times = timed_rounds(methods, dense, args.repeats)
    seconds = {method: statistics.median(t) for method, t in times.items()}
    ratios = {method: paired_ratios(times, method) for method in methods}
    errors, ppl = {}, {"dense": perplexity(dense, val)}
    for method, model in models.items():
        if method == PEER:
            model = export_modelopt(model)
        pruned = {n: p.detach() for n, p in model.named_parameters()}
        assert pruned_weights(weights, pruned) == set(names), f"{method} pruned another set of weights"
        errors[method] = {n: reconstruction_error(weights[n], pruned[n], hessians[n]) for n in names}
        ppl[method] = perplexity(model, val)
        print(
            f"{method}: val ppl {ppl[method]:.3f} (pruning {seconds[method]:.2f} s, median of {args.repeats}; "
            f"{time.perf_counter() - started:.0f} s in all)",
            flush=True,
        )

    ours = [m for m in methods if m.startswith(OURS)]
    print(
        f"\nLlama (hidden {LLAMA['hidden_size']}, MLP {LLAMA['intermediate_size']}, "
        f"{LLAMA['num_hidden_layers']} layers), relative output error on held-out inputs; "
        f"{args.calibration_batches} calibration batches of {args.batch_size}x128 tokens; {args.threads} threads\n"
    )
    print("| layer | " + " | ".join(methods) + " | " + " | ".join(f"{v} / {PEER}" for v in ours) + " |")
    print("|---|" + "---|" * (len(methods) + len(ours)))
    for n in names:
        to_peer = " | ".join(f"{errors[v][n] / errors[PEER][n]:.2f}" for v in ours)
        short = n.removeprefix("model.model.").removesuffix(".weight")
        print(f"| {short} | " + " | ".join(f"{errors[m][n]:.4f}" for m in methods) + f" | {to_peer} |")
    print(f"| **val perplexity** (dense {ppl['dense']:.3f}) | " + " | ".join(f"{ppl[m]:.3f}" for m in methods) + " |")
    cells = " | ".join(
        f"{statistics.median(ratios[m]):.2f}x ({min(ratios[m]):.2f}-{max(ratios[m]):.2f}; {seconds[m]:.2f} s)"
        for m in methods
    )
    print(f"| **pruning wall time / {PEER}'s**, median of {args.repeats} rounds (range; median time) | {cells} |")
    for v in ours:
        print(f"\n{v}:")
        for what, ratio, target, passed in acceptance(errors, ppl, statistics.median(ratios[v]), v):
            print(f"  {what}: {ratio:.3f} (target <= {target}): {'PASS' if passed else 'FAIL'}")
        fastest = min(times[v]) / min(times[PEER])  # the least disturbed calls, on a shared machine
        print(f"  (fastest call over {PEER}'s fastest call: {fastest:.3f})")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
