"""``KernelBenchmark``: when fit ends, time dense vs sparse kernels at the trained model's real layer shapes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks.benchmark_table import SPEEDUP_NOTE, ratio, table_rows
from lightning_sparse.callbacks.export import bake_masked_forward, first_batch_input
from lightning_sparse.export.plan import LayerPlan, parse_export_pattern, plan_layers
from lightning_sparse.export.verify import ModelInput, batch_size, move_input, output_tensors, run_model
from lightning_sparse.kernels.timing import (
    DENSE,
    DENSE_CONV,
    SPARSE,
    SPARSE_CONV,
    check_candidates,
    conv_candidates,
    linear_candidates,
    time_calls,
)
from lightning_sparse.nn.convert import to_sparse_inference

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cast(example: ModelInput, model: nn.Module) -> ModelInput:
    param = next(model.parameters())
    return move_input(example, param.device, param.dtype)


def _ratios(times: dict[str, float], dense: str = DENSE) -> dict[str, float]:
    return {name: times[dense] / t for name, t in times.items() if name != dense} if dense in times else {}


def _total_speedup(rows: list[dict[str, Any]], dense: str, sparse: str) -> float | None:
    """Summed dense time over summed sparse time of the rows that timed both."""
    timed = [row["times_ms"] for row in rows if dense in row.get("times_ms", {}) and sparse in row["times_ms"]]
    return sum(t[dense] for t in timed) / sum(t[sparse] for t in timed) if timed else None


class KernelBenchmark(Callback):
    """At the end of fit (rank zero), time every linear and Conv2d layer the export would convert, at its real shape.

    Per linear layer (``nn.Linear``, or Hugging Face ``Conv1D`` timed on its ``(out, in)`` view, the transpose of
    its stored weight), at the token count it saw on a real training batch (or ``tokens``): dense ``F.linear``
    against :class:`~lightning_sparse.nn.SparseLinear` (what the exported model runs: torch's CPU BSR path on CPU,
    our Triton kernels on CUDA) and, on CUDA, against our ``bsr_linear`` / ``sparse24_linear`` and torch's
    ``bsr_dense_mm`` / ``to_sparse_semi_structured``. Per Conv2d layer, on the input it saw on the real batch: the
    dense layer against :class:`~lightning_sparse.nn.SparseConv2d`. Every candidate's output is checked before it
    is timed. Then the whole sparse inference model (converted Linear and Conv2d layers) against the dense model
    on the real batch. Ratios are dense time over candidate time (> 1: faster). The results go to
    ``<dirpath>/kernel_benchmark.json``, to the loggers (``benchmark/speedup/<layer>``,
    ``benchmark/linear_speedup``, ``benchmark/conv_speedup``, ``benchmark/model_speedup``), to :attr:`results`
    and to a printed table; each row holds the layer's ``shape`` as stored and its ``matrix_shape`` ``(out, in)``.
    Layers that are not converted (shapes the block does not divide, convolutions that read too many of their
    input channels to run faster, tied weights, other layer types) are listed with the reason. A dict batch (a
    Hugging Face batch) is passed as ``model(**batch)``.

    Args:
        dirpath: where to write the JSON; default: the Trainer's ``log_dir``.
        tokens: rows per Linear call to time; default: what each layer saw on the first training batch (Conv2d
            layers always take their input from that batch).
        pattern: ``"RxC"`` BSR blocks or ``"2:4"``, as exported.
        warmup: milliseconds of untimed calls per candidate.
        rep: milliseconds of timed calls per candidate (median of ``do_bench`` on CUDA, of Timer rounds on CPU).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to time in; default: the model's dtype.

    Raises:
        ValueError: on a bad ``pattern`` (``"dense"`` included), ``tokens < 1``, ``warmup < 0``, ``rep <= 0`` or an
            unknown ``dtype``; at fit end, when there is neither ``tokens`` nor a tensor batch to count them on.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import KernelBenchmark, MagnitudePruning

        trainer = Trainer(callbacks=[MagnitudePruning(density=0.1, pattern="32x32"), KernelBenchmark()])
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        tokens: int | None = None,
        pattern: str = "32x32",
        warmup: float = 25.0,
        rep: float = 100.0,
        dtype: str | None = None,
    ) -> None:
        self.fmt, self.blocksize = parse_export_pattern(pattern)
        if self.fmt == "dense":
            raise ValueError('pattern must be "RxC" blocks or "2:4" (there is nothing to time for "dense")')
        if not warmup >= 0 or not rep > 0:
            raise ValueError(f"warmup must be >= 0 and rep > 0 (milliseconds), got warmup={warmup}, rep={rep}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or None, got {dtype!r}")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.tokens = None if tokens is None else check_int("tokens", tokens, 1)
        self.pattern, self.warmup, self.rep, self.dtype = pattern, float(warmup), float(rep), dtype
        self.results: dict[str, Any] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.benchmark(trainer, pl_module)

    def benchmark(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Runs the benchmark now; returns (and stores in :attr:`results`) what goes to the JSON file."""
        bake_masked_forward(trainer)
        device = trainer.strategy.root_device
        model = copy.deepcopy(pl_module).to(device=device, dtype=_DTYPES.get(self.dtype)).eval()
        example = first_batch_input(trainer)
        example = None if example is None else move_input(example, device)
        plans = plan_layers(model, self.pattern)
        inputs = self._layer_inputs(model, [p for p in plans if p.convert], example)
        layers = [self._layer(plan, inputs.get(plan.name)) for plan in plans]
        self.results = {
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "pattern": self.pattern,
            "torch_version": str(torch.__version__),
            "layers": layers,
            "linear_speedup": _total_speedup(layers, DENSE, SPARSE),
            "conv_speedup": _total_speedup(layers, DENSE_CONV, SPARSE_CONV),
            "model": self._whole_model(model, [p.name for p in plans if p.convert], example, device),
        }
        path = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir) / "kernel_benchmark.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=2) + "\n")
        self._log(trainer)
        _print_table(self.results, path)
        return self.results

    @torch.inference_mode()
    def _layer_inputs(
        self, model: nn.Module, plans: list[LayerPlan], example: ModelInput | None
    ) -> dict[str, Tensor]:
        if self.tokens is None and example is None:
            raise ValueError("KernelBenchmark needs tokens=... when the train dataloader yields no tensor batch")
        inputs = self._random_rows(model, plans)
        hooked = [p for p in plans if p.name not in inputs]
        if example is None or not hooked:
            return inputs

        def record(plan: LayerPlan) -> Any:
            in_features = plan.matrix().shape[1]

            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0] if isinstance(module, nn.Conv2d) else args[0].reshape(-1, in_features)
                inputs.setdefault(plan.name, x)  # a linear layer: the rows it multiplies

            return hook

        hooks = [p.module.register_forward_pre_hook(record(p)) for p in hooked]
        try:
            run_model(model, _cast(example, model))
        finally:
            for hook in hooks:
                hook.remove()
        return inputs

    def _random_rows(self, model: nn.Module, plans: list[LayerPlan]) -> dict[str, Tensor]:
        """With ``tokens``: random rows for the linear layers (Conv2d layers take the batch's input)."""
        if self.tokens is None:
            return {}
        param = next(model.parameters())
        shapes = {p.name: (self.tokens, p.matrix().shape[1]) for p in plans if not isinstance(p.module, nn.Conv2d)}
        return {name: torch.randn(shape, device=param.device, dtype=param.dtype) for name, shape in shapes.items()}

    def _layer(self, plan: LayerPlan, x: Tensor | None) -> dict[str, Any]:
        row = {"name": plan.name, **plan.entry()}
        if not plan.convert or x is None:
            row["reason"] = row["reason"] or "not called on the example batch"
            return row
        if isinstance(plan.module, nn.Conv2d):
            fns, dense, sparse = conv_candidates(plan.module, x, self.blocksize), DENSE_CONV, SPARSE_CONV
            row["input_shape"] = list(x.shape)
        else:
            fns, dense, sparse = linear_candidates(plan.module, x, self.fmt, self.blocksize), DENSE, SPARSE
            row["tokens"] = x.shape[0]
        good, bad = check_candidates(fns, reference=dense)
        times = time_calls(good, x.device, self.warmup, self.rep)
        speedup = _ratios(times, dense).get(sparse)
        row.update(times_ms=times, speedups=_ratios(times, dense), errors=bad, speedup=speedup)
        row["faster"] = None if speedup is None else speedup > 1
        return row

    def _whole_model(self, model: nn.Module, converted: list[str], example: ModelInput | None, device: Any) -> dict:
        if example is None or not converted or "" in converted:
            return {"reason": "no example batch" if example is None else "no layer to convert"}
        sparse = to_sparse_inference(copy.deepcopy(model), pattern=self.pattern, include=converted)
        x = _cast(example, model)
        fns = {
            DENSE: lambda: output_tensors(run_model(model, x))[0],
            SPARSE: lambda: output_tensors(run_model(sparse, x))[0],
        }
        good, bad = check_candidates(fns)
        times = time_calls(good, device, self.warmup, self.rep)
        return {"inputs": batch_size(x), "times_ms": times, "speedup": _ratios(times).get(SPARSE), "errors": bad}

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = {f"benchmark/speedup/{r['name']}": r["speedup"] for r in self.results["layers"] if r.get("speedup")}
        metrics["benchmark/linear_speedup"] = self.results["linear_speedup"]
        metrics["benchmark/conv_speedup"] = self.results["conv_speedup"]
        metrics["benchmark/model_speedup"] = self.results["model"].get("speedup")
        metrics = {key: value for key, value in metrics.items() if value is not None}
        for logger in trainer.loggers:  # after fit, self.log is closed: write to the loggers directly
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


def _print_table(results: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    title = f"KernelBenchmark on {results['device']} ({results['dtype']}, pattern {results['pattern']}); {SPEEDUP_NOTE}"
    table = Table(title=title)
    for column in header:
        table.add_column(column, no_wrap=column != "verdict")
    for row in rows:
        table.add_row(*row)
    model = results["model"]
    console = Console()
    console.width = console.width if console.is_terminal else 160  # logs and pipes: no wrapping at 80 columns
    console.print(table)
    for kind, key in (("linear", "linear_speedup"), ("Conv2d", "conv_speedup")):
        console.print(f"all converted {kind} layers together: speed-up {ratio(results[key])} vs dense")
    whole = f"speed-up {ratio(model['speedup'])} vs dense" if "speedup" in model else model["reason"]
    console.print(f"whole model on {results['device']} (batch of {model.get('inputs', '-')}): {whole}")
    console.print(f"written to {path}", markup=False)
