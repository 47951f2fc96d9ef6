"""Export any algorithm's Lightning checkpoint: ``export_checkpoint`` and the ``python -m lightning_sparse.export`` CLI.

Example:

.. code-block:: bash

    lightning-sparse fit --config configs/gmp_bsr_export.yaml
    lightning-sparse-export --config configs/gmp_bsr_export.yaml \\
        --ckpt_path runs/gmp_bsr_export/checkpoints/last.ckpt --out runs/gmp_bsr_export/export
    python -m lightning_sparse.export --model lightning_sparse.models.SmallCNN \\
        --ckpt_path runs/gmp_bsr_export/checkpoints/last.ckpt --out export --pattern 32x32 --require_sparse

Without ``--pattern`` the export stores the masks in the pattern the training used, read from the checkpoint's
sparsity callback state (:func:`~lightning_sparse.export.outcome.default_pattern`). The command ends with
``k of n layers stored sparse (x MB -> y MB)``; an export that stores no layer sparse warns, with each reason
(``--require_sparse``: an error, nothing written). A Hugging Face model (``--model
lightning_sparse.models.HFCausalLM``) also gets ``hf/``, its ``save_pretrained`` folder (``--no-hf``: not).
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from rich.console import Console

from lightning_sparse.export.manifest import Manifest
from lightning_sparse.export.outcome import (
    NoSparseLayerError,
    default_pattern,
    no_sparse_reason,
    same_format,
    stored_line,
    training_layer_patterns,
)
from lightning_sparse.export.plan import plan_layers
from lightning_sparse.export.sparse_io import export_sparse
from lightning_sparse.recipes import resolve_config


def _from_config(config: str | Path, state: dict) -> tuple[LightningModule, LightningDataModule | None]:
    from lightning_sparse.cli import SparseCLI  # imports every callback, including the ones that import this module

    cli = SparseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
    )
    cli.model.load_state_dict(state, strict=True)
    return cli.model, cli.datamodule


def _from_class_path(class_path: str, ckpt_path: str | Path) -> LightningModule:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"model must be a YAML config file or an importable class path, got {class_path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise TypeError(f"model class path {class_path!r} must name a LightningModule subclass, got {cls!r}")
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu")


def _example_batch(
    model: LightningModule, datamodule: LightningDataModule | None
) -> torch.Tensor | dict[str, torch.Tensor] | None:
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        return batch[0] if isinstance(batch, tuple | list) else batch
    example = getattr(model, "example_input_array", None)
    if isinstance(example, torch.Tensor):  # a random batch of its shape: zeros would only exercise the biases
        return torch.randn_like(example) if example.is_floating_point() else example
    return None


def export_checkpoint(
    ckpt_path: str | Path,
    model: str | Path,
    out_dir: str | Path,
    pattern: str | None = None,
    include: str | Sequence[str] | None = None,
    verify: bool = True,
    hf: bool | None = None,
    require_sparse: bool = False,
) -> Manifest:
    """Exports a checkpoint of any algorithm: its model ``state_dict`` holds the dense weights with zeros.

    Args:
        ckpt_path: the Lightning checkpoint (``.ckpt``).
        model: the run's YAML config (``lightning-sparse fit --config``; model and data are built from it and the
            checkpoint's weights loaded strictly), or a LightningModule class path such as
            ``"lightning_sparse.models.SmallCNN"`` (built by ``load_from_checkpoint`` from its hyperparameters).
        out_dir: the export directory.
        pattern: ``"RxC"``, ``"2:4"`` or ``"dense"``; ``None``: the pattern the training used, from the checkpoint's
            sparsity callback state (:func:`~lightning_sparse.export.outcome.default_pattern`).
        include: FQN globs of the layers to convert (see :func:`export_sparse`).
        verify: check the outputs on a real training batch (config; a dict batch is passed as ``model(**batch)``),
            or on a random batch shaped like the model's ``example_input_array`` (class path); skipped with a
            warning when neither exists.
        hf: the Hugging Face folder of a model that holds one (see :func:`export_sparse`): ``None`` when there is
            one, ``True`` always, ``False`` never.
        require_sparse: raise, before writing anything, when no layer would be stored sparse (else a warning that
            says so and why).

    Returns:
        The written :class:`Manifest`.

    Raises:
        FileNotFoundError: if ``ckpt_path`` does not exist.
        NoSparseLayerError: with ``require_sparse``, when no layer would be stored sparse (a ValueError).
        ValueError: if ``model`` is neither a config file nor an importable class path; as :func:`export_sparse`.
        TypeError: if the class path is not a LightningModule.
    """
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path {str(ckpt_path)!r} is not a file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    layer_patterns = None
    if pattern is None:  # the training's: the most weights' pattern, and each layer's own blocks where it had them
        pattern = default_pattern(checkpoint)[0]
        layer_patterns = same_format(pattern, training_layer_patterns(checkpoint))
    if Path(model).suffix in (".yaml", ".yml") or Path(model).is_file():
        module, datamodule = _from_config(model, checkpoint["state_dict"])
    else:
        module, datamodule = _from_class_path(str(model), ckpt_path), None
    plans = plan_layers(module, pattern, include, layer_patterns)
    if not any(plan.convert for plan in plans):
        message = no_sparse_reason(pattern, {plan.name: plan.reason for plan in plans if plan.reason})
        if require_sparse:
            raise NoSparseLayerError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    example = _example_batch(module, datamodule) if verify else None
    if verify and example is None:
        warnings.warn("export_checkpoint: no batch to verify the outputs on; exporting unverified", stacklevel=2)
    return export_sparse(module, out_dir, pattern=pattern, layer_patterns=layer_patterns, include=include,
                         example_input=example, hf=hf)


def main(argv: Sequence[str] | None = None) -> Manifest:
    """``python -m lightning_sparse.export``: parses the arguments, exports, prints the manifest's table."""
    description = "Export a Lightning checkpoint of any sparsity algorithm to BSR / 2:4 / dense safetensors files."
    parser = argparse.ArgumentParser(prog="python -m lightning_sparse.export", description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the run's YAML config (model and data), or a bundled recipe's name")
    source.add_argument("--model", help="LightningModule class path, e.g. lightning_sparse.models.SmallCNN")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint to export")
    parser.add_argument("--out", required=True, help="export directory")
    parser.add_argument("--pattern", default=None,
                        help='"RxC" blocks, "2:4" or "dense" (default: the pattern the training used)')
    parser.add_argument("--include", nargs="*", default=None, help="FQN globs of the layers to convert")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the output check")
    parser.add_argument("--require_sparse", action="store_true",
                        help="fail (and write nothing) when no layer would be stored sparse")
    parser.add_argument("--no-hf", dest="hf", action="store_const", const=False, default=None,
                        help="do not write the Hugging Face save_pretrained folder hf/ of a Hugging Face model")
    args = parser.parse_args(argv)
    try:
        source = resolve_config(args.config) if args.config else args.model
    except ValueError as err:
        parser.error(str(err))
    if args.pattern is None and Path(args.ckpt_path).is_file():  # export_checkpoint picks it; say which and why
        checkpoint = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
        pattern, why = default_pattern(checkpoint)
        own = {name: p for name, p in same_format(pattern, training_layer_patterns(checkpoint)).items() if p != pattern}
        if own:
            why += "; in their own blocks: " + ", ".join(f"{name} ({p})" for name, p in own.items())
        Console(stderr=True).print(f"pattern {pattern}: {why}", markup=False, highlight=False)
    try:
        manifest = export_checkpoint(args.ckpt_path, source, args.out, args.pattern, args.include, args.verify,
                                     args.hf, args.require_sparse)
    except NoSparseLayerError as err:
        parser.exit(1, f"error: {err}\n")
    error = (manifest.verification or {}).get("max_abs_error")
    checked = "unverified" if error is None else f"verified, max abs error {error:.3g}"
    text = f"exported to {args.out} ({checked})\n{manifest.summary()}\n{stored_line(manifest, args.out)}"
    Console(soft_wrap=True).print(text, markup=False, highlight=False)
    return manifest


def console_main() -> None:
    """The ``lightning-sparse-export`` console script (returns None, so a successful export exits with status 0)."""
    main()
