"""``SparseExport``: when fit ends, write the trained model as BSR / 2:4 / dense-with-zeros files and verify them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.export.manifest import Manifest
from lightning_sparse.export.outcome import FALLBACK_PATTERN, export_pattern, no_sparse_reason, same_format, stored_line
from lightning_sparse.export.plan import check_include, parse_export_pattern
from lightning_sparse.export.sparse_io import export_sparse


def first_batch_input(trainer: pl.Trainer) -> Tensor | dict[str, Tensor] | None:
    """The model input of the first batch of the (first) train dataloader: ``batch[0]`` for a tuple or list, a dict
    of tensors as it is (keyword inputs, ``model(**batch)``: a Hugging Face batch); ``None`` for anything else."""
    loader = trainer.train_dataloader
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, Sequence):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    batch = next(iter(loader), None)
    if isinstance(batch, Mapping):
        tensors = batch and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in batch.items())
        return dict(batch) if tensors else None
    batch = batch[0] if isinstance(batch, tuple | list) and batch else batch
    return batch if isinstance(batch, Tensor) else None


def _sparsity_callbacks(trainer: pl.Trainer) -> list[SparsityCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, SparsityCallback) and cb.masks is not None]


def bake_masked_forward(trainer: pl.Trainer) -> None:
    """Calls ``bake()`` on every sparsity callback that keeps dense weights with a masked forward (Spartan,
    Top-KAST) and has not baked yet, so the model's parameters are the dense-with-zeros model."""
    for callback in _sparsity_callbacks(trainer):
        if not callback.hard_mask and hasattr(callback, "bake"):
            callback.bake()  # idempotent


def check_hard_masks(trainer: pl.Trainer) -> None:
    """Checks that every hard-mask callback's masks still hold: each weight outside its mask is exactly zero.

    Raises:
        ValueError: naming the callback and the layers whose weights are non-zero outside their masks.
    """
    for callback in _sparsity_callbacks(trainer):
        moved = callback.masks.names_with_weights_outside_mask() if callback.hard_mask else []
        if moved:
            raise ValueError(
                f"cannot export: the masks of {type(callback).__name__} no longer hold for {moved}: weights "
                "outside the mask are non-zero (a weight changed after masking)"
            )


def trained_patterns(trainer: pl.Trainer) -> tuple[str, dict[str, str]]:
    """The export pattern of the most weights the trainer's sparsity callbacks masked, and each target's own (see
    :func:`~lightning_sparse.export.outcome.export_pattern`), of that pattern's format."""
    from lightning_sparse.callbacks.base import SparsityCallback

    own: dict[str, str] = {}
    counts: dict[str, int] = {}
    for callback in trainer.callbacks:
        masks = getattr(callback, "masks", None) if isinstance(callback, SparsityCallback) else None
        chosen = export_pattern(str(callback.pattern)) if masks is not None else None
        if chosen is not None:
            for name, param in masks.params.items():
                own[name] = chosen
                counts[chosen] = counts.get(chosen, 0) + param.numel()
    pattern = max(counts, key=counts.get) if counts else FALLBACK_PATTERN
    return pattern, same_format(pattern, own)


class SparseExport(Callback):
    """At the end of fit (rank zero), export the model with :func:`~lightning_sparse.export.export_sparse`.

    It first checks that the hard masks of every sparsity callback still hold and bakes masked-forward callbacks,
    then writes ``model.safetensors``, ``sparse.safetensors`` and ``manifest.json`` to ``dirpath`` (and, for a
    Hugging Face model such as :class:`~lightning_sparse.models.HFCausalLM`, its ``save_pretrained`` folder
    ``hf/``), verifying the sparse model's (and the reloaded Hugging Face folder's) outputs on the first training
    batch (a tensor, or a dict batch passed as ``model(**batch)``). The per-layer densities and the paths go to the
    log; the manifest is kept in :attr:`manifest`. Export a checkpoint later with ``python -m lightning_sparse.export``.

    Args:
        dirpath: export directory; a relative path is taken under the Trainer's ``default_root_dir``.
        pattern: ``"RxC"`` BSR blocks (``"32x32"``), ``"2:4"`` or ``"dense"`` for every layer; ``None``: the
            patterns the sparsity callbacks trained (each layer in its own blocks; 2:4 for N:4 masks with N <= 2;
            the pattern of the most weights for the others, 32x32 when no callback trained blocks or 2:4).
        include: FQN globs of the layers to convert; ``None``: every layer that fits and is worth converting (see
            :func:`~lightning_sparse.export.plan.plan_layers`).
        verify: check the exported models' outputs against the dense-with-zeros model on a real batch.
        hf: write the Hugging Face folder: ``None`` when the model holds a Hugging Face model (with a warning when
            it cannot be written), ``True`` always (an error when it cannot be), ``False`` never.

    Raises:
        ValueError: on a bad ``pattern`` (at construction); at fit end, as
            :func:`~lightning_sparse.export.export_sparse`, or when a hard mask no longer holds.
        TypeError: if ``include`` is not a glob or a list of globs, or ``hf`` is not a bool or None.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import MagnitudePruning, SparseExport

        trainer = Trainer(callbacks=[MagnitudePruning(density=0.1, pattern="32x32"), SparseExport(pattern="32x32")])
    """

    def __init__(
        self,
        dirpath: str | Path = "sparse_export",
        pattern: str | None = None,
        include: str | Sequence[str] | None = None,
        verify: bool = True,
        hf: bool | None = None,
    ) -> None:
        if pattern is not None:
            parse_export_pattern(pattern)
        if hf is not None and not isinstance(hf, bool):
            raise TypeError(f"hf must be True, False or None, got {hf!r}")
        self.dirpath = Path(dirpath)
        self.pattern = pattern
        self.include = check_include(include)
        self.verify = bool(verify)
        self.hf = hf
        self.manifest: Manifest | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath), pattern=self.pattern)

    def resolve_dirpath(self, trainer: pl.Trainer) -> Path:
        """``dirpath``, under ``trainer.default_root_dir`` when relative."""
        return self.dirpath if self.dirpath.is_absolute() else Path(trainer.default_root_dir) / self.dirpath

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Manifest:
        """Checks the masks, bakes, exports (and verifies); returns the manifest."""
        check_hard_masks(trainer)
        bake_masked_forward(trainer)
        example = first_batch_input(trainer) if self.verify else None
        if self.verify and example is None:
            rank_zero_warn(
                "SparseExport: no tensor or dict-of-tensors batch in the train dataloader to verify on; exporting "
                "unverified"
            )
        path = self.resolve_dirpath(trainer)
        pattern, layer_patterns = (self.pattern, None) if self.pattern is not None else trained_patterns(trainer)
        self.manifest = export_sparse(pl_module, path, pattern=pattern, layer_patterns=layer_patterns,
                                      include=self.include, example_input=example, hf=self.hf)
        error = (self.manifest.verification or {}).get("max_abs_error")
        checked = "unverified" if error is None else f"outputs verified, max abs error {error:.3g}"
        rank_zero_info(f"SparseExport: wrote {path} ({checked})\n{self.manifest.summary()}\n"
                       f"{stored_line(self.manifest, path)}")
        if not self.manifest.converted:
            rank_zero_warn(f"SparseExport: {no_sparse_reason(pattern, self.manifest.skipped)}")
        return self.manifest
