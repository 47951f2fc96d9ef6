r"""SparseGPT: one-shot, data-driven pruning with OBS weight updates, unstructured or N:M.

Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774. Each target weight :math:`W` is pruned by
:func:`~lightning_sparse.core.obs.obs_prune` against the Hessian of its layer-wise reconstruction error,

.. math::

    H = \frac{2}{n} \sum_{i=1}^{n} x_i x_i^\top \qquad \text{(the } n \text{ input rows the weight multiplies)},

accumulated from real calibration batches through forward hooks (:mod:`lightning_sparse.layer_inputs`: Linear,
Conv1d/2d, MultiheadAttention projections including ``out_proj``). The compensating updates of the kept weights are
written back into the model. With ``sequential=True`` the layers are pruned one at a time in forward order, the
calibration batches re-run for each, so every layer's Hessian comes from the outputs of the already-pruned layers
before it; ``sequential=False`` takes every Hessian from one pass of the dense model. Under DDP the Hessians and
token counts are summed over ranks, so every rank computes the same masks and weights.

:func:`sparsegpt_` works on any ``nn.Module``; :class:`SparseGPT` runs it inside Lightning and keeps the masks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info
from rich.progress import track
from torch import Tensor, nn

from lightning_sparse.calibration import (
    BlockInputs,
    BlocksNotCalled,
    Forward,
    default_forward,
    find_blocks,
    shared_input_groups,
)
from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks._run_end import planned_steps
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.core.obs import check_budget, obs_prune
from lightning_sparse.core.obs_refine import check_refinement
from lightning_sparse.core.patterns import NM
from lightning_sparse.distributed import local, shard_of
from lightning_sparse.layer_inputs import collect_hessians, forward_order, input_kinds
from lightning_sparse.layers import check_pattern, kind_of
from lightning_sparse.replay import GroupPasses, recording_calls
from lightning_sparse.targets import select_targets


def _pruner(
    density: float | None, nm: str | None, block_size: int, damp: float, nm_selection: str, refit: bool, reselect: int
) -> partial:
    """Check the pruning options and bind them to :func:`obs_prune` (``prune(weight, hessian, name=...)``)."""
    density, pattern = check_budget(density, nm)
    check_refinement(nm_selection, refit, reselect, pattern)
    check_int("block_size", block_size, 1)
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0 (relative to the mean Hessian diagonal), got {damp!r}")
    options = {"nm_selection": nm_selection, "refit": refit, "reselect": reselect}
    return partial(obs_prune, density=density, nm=pattern, block_size=block_size, damp=float(damp), **options)


class _Writer:
    """Prunes one target on its layer's ``(out, in)`` view and writes the result back in the layer's own layout.

    An FSDP2 shard is gathered whole for its layer's turn (every rank computes the same pruning from the same
    all-reduced Hessian), and only this rank's rows are written back and kept as its mask: one layer's full weight
    at a time beyond the shards."""

    def __init__(self, model: nn.Module, prune: partial) -> None:
        self.params, self.prune = dict(model.named_parameters()), prune
        self.kinds = kind_of(model, list(self.params))
        self.masks: dict[str, Tensor] = {}
        self.peak_gathered = 0  # the most bytes of gathered weight held at once (FSDP2)

    def __call__(self, name: str, hessian: Tensor) -> None:
        param, kind = self.params[name], self.kinds[name]
        shard = shard_of(param, name)
        whole = param.full_tensor() if shard is not None else param
        if shard is not None:
            self.peak_gathered = max(self.peak_gathered, whole.numel() * whole.element_size())
        matrix = kind.as_matrix(whole) if kind is not None else whole.reshape(whole.shape[0], -1)
        weight, mask = self.prune(matrix, hessian, name=name)
        weight, mask = self._layout(name, weight), self._layout(name, mask).contiguous()
        if shard is not None:
            rows = slice(shard.row_offset, shard.row_offset + shard.rows)
            weight, mask = weight[rows], mask[rows].clone()
        local(param.data).copy_(weight)
        self.masks[name] = mask

    def _layout(self, name: str, matrix: Tensor) -> Tensor:
        """An ``(out, in)`` matrix in the layout of parameter ``name``."""
        kind, shape = self.kinds[name], self.params[name].shape
        return kind.from_matrix(matrix, shape) if kind is not None else matrix.reshape(shape)


def _block_inputs(model: nn.Module, blocks: str | None, batches: list, forward: Forward) -> BlockInputs | None:
    """The cached inputs of the first block, or ``None`` (no block list, or its blocks are not called as modules)."""
    if blocks is None:
        return None
    try:
        return BlockInputs(model, blocks, batches, forward)
    except BlocksNotCalled:
        rank_zero_debug(f"SparseGPT: {blocks}.0 is never called; calibrating with the whole model per layer")
        return None


def _replayed(passes: GroupPasses, group: int, model: nn.Module, call: int) -> None:
    """A ``forward(model, call)`` for :func:`collect_hessians`: group ``group``'s pass over cached call ``call``."""
    passes.run(group, call)


def _prune_by_blocks(model: nn.Module, order: list[str], inputs: BlockInputs, blocks: str, write: _Writer,
                     show: bool, whole_blocks: bool = False) -> None:
    """Sequential pruning, one block at a time on cached block inputs (see :mod:`lightning_sparse.calibration`), each
    group of layers calibrated on a replayed pass of the block (:mod:`lightning_sparse.replay`); ``whole_blocks``:
    every target of a block from one pass of that block (the SparseGPT paper's order)."""
    kinds = input_kinds(model, order)
    owners = {n: owner for n, (owner, kind) in kinds.items() if kind != "attn_out"}
    last = max(int(name[len(blocks) + 1:].split(".", 1)[0]) for name in order)
    for index in track(range(last + 1), description="SparseGPT", transient=True, disable=not show):
        prefix = f"{blocks}.{index}."
        in_block = [name for name in order if name.startswith(prefix)]
        probe = partial(inputs.forward_block(index), model, inputs.calls[0])
        sequence = None
        if whole_blocks:
            groups = [in_block]
        else:
            with recording_calls(inputs.blocks[index], []) as sequence:
                groups = shared_input_groups(model, in_block, owners, probe)
        passes = GroupPasses(inputs.blocks[index], inputs.calls,
                             [[kinds[name][0][len(prefix):] for name in group] for group in groups],
                             [all(kinds[name][1] != "attn_out" for name in group) for group in groups],
                             shared_inputs=not whole_blocks, sequence=sequence)
        for number, group in enumerate(groups):
            hessians = collect_hessians(model, group, range(len(inputs.calls)),
                                        partial(_replayed, passes, number))
            for name in group:
                write(name, hessians.pop(name))
        if index < last:
            inputs.advance(index, [passes.run(len(groups), call) for call in range(len(inputs.calls))])


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    names: Sequence[str],
    batches: list,
    forward: Forward,
    prune: partial,
    sequential: bool | str,
    show: bool,
) -> dict[str, Tensor]:
    """:func:`sparsegpt_` on checked target names, ``prune(weight, hessian, name=...)`` being :func:`obs_prune` with
    checked options; ``show``: a progress bar on rank zero (the model runs in eval mode)."""
    training = model.training
    model.eval()
    write = _Writer(model, prune)
    show = show and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0)
    try:
        order = forward_order(model, names, batches[0], forward)
        blocks = find_blocks(model, names) if sequential else None
        inputs = _block_inputs(model, blocks, batches, forward)
        if inputs is not None:
            _prune_by_blocks(model, order, inputs, blocks, write, show, whole_blocks=sequential == "blocks")
        else:
            hessians = {} if sequential else collect_hessians(model, order, batches, forward)
            for name in track(order, description="SparseGPT", transient=True, disable=not show):
                hessian = collect_hessians(model, [name], batches, forward)[name] if sequential else hessians.pop(name)
                write(name, hessian)
    finally:
        model.train(training)
    if write.peak_gathered:
        rank_zero_info(f"SparseGPT: pruned {len(names)} sharded weights one at a time, at most "
                       f"{write.peak_gathered / 2**20:.1f} MiB of whole weight gathered at once per rank")
    return {name: write.masks[name] for name in names}


def _check_sequential(sequential: bool | str) -> None:
    if sequential not in (True, False, "blocks"):
        raise ValueError(f"sequential must be True, False or 'blocks', got {sequential!r}")


def sparsegpt_(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    density: float | None = None,
    nm: str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    nm_selection: str = "joint",
    refit: bool = False,
    reselect: int = 0,
    sequential: bool | str = True,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    forward: Forward | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Prune ``model`` in place with SparseGPT; returns the boolean masks by parameter name.

    Args:
        model: any module; its target weights are overwritten with the pruned, OBS-updated weights.
        batches: calibration batches (iterated once per target when ``sequential``).
        density: fraction of weights kept per layer (unstructured), exactly ``round(density * numel)``.
        nm: ``"N:M"`` such as ``"2:4"``: ``N`` kept in every ``M`` consecutive inputs.
        block_size: columns per lazy OBS block.
        damp: Hessian dampening relative to its mean diagonal (retried x10 when not positive definite).
        nm_selection: ``"joint"``: each group's removed weights minimise their exact joint OBS error (Hassibi & Stork
            1993; Frantar & Alistarh 2022, https://arxiv.org/abs/2208.11580); ``"independent"``: the SparseGPT
            paper's per-weight saliency. See :func:`~lightning_sparse.core.obs.obs_prune`.
        refit: least-squares refit of the kept weights on the calibration Hessian (``O(rows * k^3)`` per layer).
        reselect: passes of exact group-wise N:M mask re-selection before the refit (needs ``nm`` and ``refit``;
            :mod:`lightning_sparse.core.obs_refine`).
        sequential: ``True``: prune layer by layer in forward order, each seeing the already-pruned layers before it
            (calibrated block by block when the model has a block list, with the same result, each group of layers
            on a pass of the block that replays what the groups before left unchanged: about 1.5 passes per block,
            see :mod:`lightning_sparse.replay`); ``"blocks"``: block by block, every layer of a block from one pass of
            it over the pruned blocks before (the SparseGPT paper's order); ``False``: every Hessian from one pass of
            the dense model.
        include: glob patterns of parameter names (default: Linear, Conv and attention weights).
        exclude: glob patterns of parameter names to keep dense.
        forward: ``forward(model, batch)`` runs one batch; default :func:`default_forward`.
        progress: show a progress bar over the layers (rank zero only).

    Raises:
        ValueError: no batches; both or neither of ``density``/``nm``; a bad density, ``nm`` or option (see
            :func:`~lightning_sparse.core.obs_refine.check_refinement`); ``M`` not dividing a target's input
            dimension; an unsupported target; a batch set that never reaches a target; a Hessian that is not positive
            definite.
        TypeError: for ``forward`` not callable or arguments of the wrong type.

    Example::

        import itertools
        from lightning_sparse import sparsegpt_
        from lightning_sparse.data import PythonSourceDataModule
        from lightning_sparse.models import CharGPT

        data = PythonSourceDataModule(block_size=128)
        data.setup()
        model = CharGPT(block_size=128)  # a trained one, in practice
        batches = [x for x, _ in itertools.islice(data.train_dataloader(), 32)]
        masks = sparsegpt_(model, batches, nm="2:4")
        # slower, lower error: sparsegpt_(model, batches, nm="2:4", refit=True, reselect=2)
    """
    prune = _pruner(density, nm, block_size, damp, nm_selection, refit, reselect)
    _check_sequential(sequential)
    pattern = prune.keywords["nm"]
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("sparsegpt_ needs at least one calibration batch, got none")
    names = select_targets(model, include, exclude)
    if pattern is not None:
        kinds = kind_of(model, names)
        for name in names:
            check_pattern(pattern, name, kinds[name], tuple(model.get_parameter(name).shape))
    input_kinds(model, names)
    return prune_layers(model, names, batches, forward or default_forward, prune, sequential, progress)


class SparseGPT(SparsityCallback):
    """Prune once with SparseGPT on calibration batches from the train dataloader, then keep the masks.

    At ``at="fit_start"`` the model is pruned before the first optimizer step, so training fine-tunes the sparse model
    (gradients of pruned weights masked, zeros kept); at ``at="fit_end"`` it is pruned after the run's last planned
    optimizer step (``trainer.estimated_stepping_batches``, so checkpoints written at the end hold the pruned model),
    or when training stops early. The masks and an "already pruned" flag are checkpointed: a resumed run never prunes
    again. Batches run through ``calibration_forward`` (override it for batches that are not ``(x, ...)``).

    Args:
        density: fraction of weights kept per layer (unstructured); give this or ``nm``.
        nm: ``"N:M"`` such as ``"2:4"``.
        at: ``"fit_start"``, ``"fit_end"`` or an optimizer step: prune after that step (train dense first, then
            fine-tune the pruned model with its masks fixed, the "Sparse Llama" flow).
        calibration_batches: number of train batches (per rank) used for the Hessians.
        block_size: columns per lazy OBS block.
        damp: Hessian dampening relative to its mean diagonal.
        nm_selection: ``"joint"`` or ``"independent"`` N:M choice (see :func:`sparsegpt_`).
        refit: least-squares refit of the kept weights (see :func:`sparsegpt_`).
        reselect: passes of exact N:M mask re-selection; needs ``refit=True`` (see :func:`sparsegpt_`).
        sequential: prune layer by layer in forward order (see :func:`sparsegpt_`).
        include: glob patterns of parameter names to prune (default: Linear, Conv and attention weights).
        exclude: glob patterns of parameter names to keep dense.
        seed: seeds the draw of the calibration batches (the global RNG is left untouched).

    Raises:
        ValueError: both or neither of ``density``/``nm``, an unknown ``at``, ``calibration_batches`` or
            ``block_size`` < 1, ``damp`` < 0, a bad option (see :func:`sparsegpt_`); in ``setup``, an unsupported
            target or ``M`` not dividing its inputs.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import SparseGPT

        trainer = Trainer(max_steps=500, callbacks=[SparseGPT(nm="2:4", at="fit_end", exclude=["head.weight"])])
    """

    supports_fsdp2 = True

    def __init__(
        self,
        density: float | None = None,
        nm: str | None = None,
        at: str | int = "fit_start",
        calibration_batches: int = 32,
        block_size: int = 128,
        damp: float = 0.01,
        nm_selection: str = "joint",
        refit: bool = False,
        reselect: int = 0,
        sequential: bool | str = True,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self._prune = _pruner(density, nm, block_size, damp, nm_selection, refit, reselect)
        pattern = self._prune.keywords["nm"]
        super().__init__(
            density, str(pattern) if pattern else "unstructured", include=include, exclude=exclude, seed=seed
        )
        if at not in ("fit_start", "fit_end") and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ValueError(f"at must be 'fit_start', 'fit_end' or an optimizer step >= 0, got {at!r}")
        self.at = at
        self.calibration_batches = check_int("calibration_batches", calibration_batches, 1)
        self.block_size, self.damp = block_size, float(damp)
        self.nm_selection, self.refit, self.reselect = nm_selection, refit, reselect
        _check_sequential(sequential)
        self.sequential = sequential
        self.pruned = False
        self._last_step = float("inf")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            density=self.density, pattern=str(self.pattern), include=self.include, exclude=self.exclude, at=self.at
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            input_kinds(pl_module, list(self.masks.params))

    def target_density(self, step: int) -> float:
        """Dense until the model is pruned, then the final density."""
        return self.final_density if self.pruned else 1.0

    @property
    def schedule_end(self) -> int:
        """The step it prunes after: ``at``, 0 for ``"fit_start"``, the run's last planned step for ``"fit_end"``."""
        if isinstance(self.at, int):
            return self.at
        return 0 if self.at == "fit_start" or not math.isfinite(self._last_step) else int(self._last_step)

    def scheduled_density(self, step: int) -> float:
        """The final density: the model is pruned by fit end at the latest (when training stops early too)."""
        return self.final_density

    def should_update(self, step: int) -> bool:
        if self.pruned:
            return False
        if isinstance(self.at, int):
            return step >= self.at
        return self.at == "fit_start" or step >= self._last_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        planned = planned_steps(trainer)  # unknown (an endless run): prune when fit ends
        self._last_step = float("inf") if planned is None else planned
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:  # a checkpoint saved after fit keeps the state before this prune, and resumes exactly
            self.finish_update(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def calibration_forward(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Run one calibration batch (on the module's device) as :func:`~lightning_sparse.calibration.default_forward`
        does: ``pl_module(**batch)`` for a mapping, ``pl_module(batch[0])`` for a tuple or list."""
        default_forward(pl_module, batch)

    def _calibration_batches(self, trainer: pl.Trainer) -> list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            batches = list(itertools.islice(trainer.train_dataloader or [], self.calibration_batches))
        if not batches:
            raise ValueError(f"{type(self).__name__} found no calibration batch: the train dataloader is empty")
        return [trainer.strategy.batch_to_device(batch) for batch in batches]

    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        """Run SparseGPT on the targets; also writes the OBS-updated weights into ``pl_module``."""

        def forward(model: nn.Module, batch: Any) -> None:
            with trainer.precision_plugin.forward_context():
                self.calibration_forward(model, batch)

        prune = self._prune if isinstance(self.pattern, NM) else partial(self._prune, density=self.final_density)
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        batches = self._calibration_batches(trainer)
        return prune_layers(pl_module, list(self.masks.params), batches, forward, prune, self.sequential, progress)

    def update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        changed = super().update_masks(trainer, pl_module, step)
        self.pruned = True
        return changed

    def extra_state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
