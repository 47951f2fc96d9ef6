r"""``Supermask``: learned tile scores with a straight-through estimator, as in SuperBlock.

Sources: SuperBlock (https://github.com/pytorch-labs/superblock); the supermask idea from Zhou, Lan, Liu & Yosinski
2019 (https://arxiv.org/abs/1905.01067) and Ramanujan et al. 2020, "What's hidden in a randomly weighted neural
network?" (https://arxiv.org/abs/1911.13299). Each target weight :math:`w` (matrix view ``(out, -1)``) gets one learned
score :math:`s_t` per ``R x C`` tile :math:`t`. The forward keeps the layer's top-scoring tiles and trains the weights
and the scores together:

.. math::

    \tilde w = w \odot E(h), \qquad h = \mathrm{top}_{k}(s),\ k = \mathrm{round}(D \cdot \#\mathrm{tiles}), \qquad
    \frac{\partial L}{\partial s_t} = \sum_{(i, j) \in t} w_{ij} \frac{\partial L}{\partial \tilde w_{ij}}, \qquad
    \frac{\partial L}{\partial w} = E(h) \odot \frac{\partial L}{\partial \tilde w},

where :math:`E` expands a tile mask to elements and :math:`D` is the layer's density. The score gradient is the
straight-through estimate: :math:`\partial L / \partial E(h) = w \odot \partial L / \partial \tilde w`, passed to
:math:`s` as if :math:`h` were :math:`s`, summed over each tile. Ties go to the lower tile index.

The scores are parameters named ``<attr>_supermask_scores`` on the module that owns each target (e.g.
``blocks.0.attn.in_proj_weight_supermask_scores``), registered in ``setup``, before ``configure_optimizers``, so the
run's optimizer updates them (build it from ``self.parameters()``; checked at train start). State-dict hooks leave
them out of ``model.state_dict()`` and let the model load a state dict without them, so a checkpoint's model keys stay
the plain model's. The callback's own state holds their values. Their optimizer state goes through Lightning's
optimizer checkpointing, so a resumed run continues exactly. :meth:`Supermask.bake` (at train end) writes
:math:`\tilde w` into the weights, then removes the hooks and the score parameters. The optimizer still holds the
removed scores, so do not step it after ``bake``.

Under FSDP2 the scores are sharded with their module (``fully_shard`` in ``configure_model``), each rank's tile rows
beside its weight rows: the top-k runs over the local scores through the exact distributed selection, the score
gradient is summed over the local tiles, and checkpoints hold the whole scores. ``bake`` keeps the (unused) score
parameters there, still left out of ``state_dict()``: FSDP2 owns them and would put them back at the next forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sparse.callbacks.masked import MaskedForwardCallback
from lightning_sparse.callbacks.masked_fsdp2 import set_local_grad
from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.patterns import Blocks, as_matrix_shape
from lightning_sparse.distributed import (
    Shard,
    distributed_topk_each,
    group_shard,
    is_dtensor,
    local,
    rows_of,
    whole_of,
)

SUFFIX = "_supermask_scores"
SCORE_INITS = ("kaiming_uniform", "magnitude")
_TILE_RE = re.compile(r"^(\d+)(?:x(\d+))?$")


def parse_tile_size(tile_size: int | str) -> Blocks:
    """``16`` or ``"16"`` -> 16x16 tiles, ``"8x32"`` -> 8x32 tiles.

    Example::

        >>> parse_tile_size("8x32"), parse_tile_size(16)
        (Blocks(rows=8, cols=32), Blocks(rows=16, cols=16))

    Raises:
        TypeError: when ``tile_size`` is neither an int nor a string.
        ValueError: for any other string or a side below 1.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int | str):
        raise TypeError(f"tile_size must be an int or an 'RxC' string, got {type(tile_size).__name__}: {tile_size!r}")
    match = _TILE_RE.match(str(tile_size).strip().lower()) if isinstance(tile_size, str) else None
    if isinstance(tile_size, str) and match is None:
        raise ValueError(f"tile_size must be an int or an 'RxC' string such as '16x16' or '8x32', got {tile_size!r}")
    rows, cols = (tile_size, tile_size) if match is None else (int(match[1]), int(match[2] or match[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"tile_size sides must be >= 1, got {tile_size!r}")
    return Blocks(rows, cols)


def tile_sums(x: Tensor, tiles: Blocks) -> Tensor:
    """Sum of ``x`` over each tile of its matrix view: a float32 ``(rows / R, cols / C)`` grid."""
    n_rows, n_cols = as_matrix_shape(x.shape)
    return x.float().reshape(n_rows // tiles.rows, tiles.rows, n_cols // tiles.cols, tiles.cols).sum(dim=(1, 3))


class _TileMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, keep: Tensor, tiles: Blocks) -> Tensor:
        ctx.save_for_backward(weight, keep)
        ctx.tiles, ctx.scores_dtype = tiles, scores.dtype
        return torch.where(keep, weight, weight.new_zeros(()))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        weight, keep = ctx.saved_tensors
        grad_weight = torch.where(keep, grad, grad.new_zeros(())) if ctx.needs_input_grad[0] else None
        grad_scores = tile_sums(grad * weight, ctx.tiles).to(ctx.scores_dtype) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None, None


def supermask_weight(weight: Tensor, scores: Tensor, keep: Tensor, tiles: Blocks) -> Tensor:
    r"""``weight`` where ``keep`` (its element mask) and 0 elsewhere; ``scores`` (one per tile) get the
    straight-through gradient :math:`\sum_{t} w \odot \partial L / \partial \tilde w` (see the module docstring)."""
    return _TileMask.apply(weight, scores, keep, tiles)


class _OmitScores:
    """State-dict hooks of one module: ``state_dict()`` leaves out its scores; ``load_state_dict`` accepts a state
    dict without them (they keep their values)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._absent: list[str] = []

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for name in self.names:
            state_dict.pop(prefix + name, None)

    def note_absent(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        self._absent = [prefix + name for name in self.names if prefix + name not in state_dict]

    def allow_absent(self, module: nn.Module, incompatible_keys: Any) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if key not in self._absent]
        self._absent = []


class Supermask(MaskedForwardCallback):
    r"""SuperBlock's Supermask: learned tile scores, hard top-k forward, straight-through gradient.

    See the module docstring for the math and for where the scores live. Masks follow the scores after every optimizer
    step (exactly ``round(density * tiles)`` tiles per layer); the weights stay dense until :meth:`bake`.

    Args:
        density: fraction of each layer's tiles kept, in (0, 1]; ``None`` when a
            :class:`~lightning_sparse.callbacks.SparsityScheduler` gives it.
        tile_size: tile side (``16``) or ``"RxC"`` (``"16x16"``, ``"8x32"``); it must divide every target's
            matrix view. Use the same blocks for BSR export.
        include: glob patterns of parameter names to sparsify (default: Linear, Conv and attention weights,
            ``out_proj`` included).
        exclude: glob patterns of parameter names to leave dense.
        skip_first: leave the first target dense.
        skip_last: leave the last target dense.
        score_init: ``"kaiming_uniform"`` (SuperBlock: :math:`U(-1/\sqrt{n}, 1/\sqrt{n})`, :math:`n` = tiles per
            row) or ``"magnitude"`` (each tile's mean :math:`|w|`: the first mask is the magnitude top-k).
        seed: seed of the generator that draws the initial scores (identical on every rank).
        bake_at_end: write the masked weights into the parameters and drop the scores when training ends.

    Raises:
        ValueError: for a density outside (0, 1], a bad ``tile_size`` string, an unknown ``score_init``; in
            ``setup``, a tile that does not divide a target (naming it and its shape); at train start, scores that
            no optimizer updates.
        TypeError: for a ``tile_size`` that is neither an int nor a string, or other mistyped arguments.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import Supermask

        trainer = Trainer(max_epochs=10, callbacks=[Supermask(density=0.2, tile_size=16, exclude=["head.weight"])])
    """

    supports_fsdp2 = True

    def __init__(
        self,
        density: float | None = None,
        tile_size: int | str = 16,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        score_init: str = "kaiming_uniform",
        seed: int = 0,
        bake_at_end: bool = True,
    ) -> None:
        tiles = parse_tile_size(tile_size)
        if score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
        super().__init__(density, str(tiles), "uniform", include, exclude, skip_first, skip_last, 1, seed, bake_at_end)
        self.tile_size, self.score_init = tile_size, score_init
        self.scores: dict[str, Tensor] = {}
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._hooks: list[RemovableHandle] = []
        self._score_shards: dict[str, Shard | None] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.remove_scores()
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._add_scores(pl_module)

    @property
    def pattern_argument(self) -> str:
        return f"tile_size={self.tile_size!r}"

    def initial_scores(self, weight: Tensor, tiles: Blocks | None = None) -> Tensor:
        """One score per tile of ``weight`` (CPU, float32) by ``score_init``; random draws use the generator.
        ``tiles``: the tile in the weight's stored layout (default: the callback's ``tile_size``)."""
        tiles = tiles or self.pattern
        if self.score_init == "magnitude":
            return tile_sums(weight.detach().abs(), tiles).cpu() / (tiles.rows * tiles.cols)
        n_rows, n_cols = as_matrix_shape(weight.shape)
        scores = torch.empty(n_rows // tiles.rows, n_cols // tiles.cols)
        return nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=self.generator)

    def _add_scores(self, pl_module: pl.LightningModule) -> None:
        per_owner: dict[str, list[str]] = {}
        self.scores = {}
        for name, weight in self.masks.params.items():
            owner_path, _, attr = name.rpartition(".")
            owner, score_name = pl_module.get_submodule(owner_path), attr + SUFFIX
            if hasattr(owner, score_name):
                raise ValueError(f"Supermask: {owner_path or 'the model'} already has an attribute {score_name!r}")
            initial = self.initial_scores(weight, self.masks.pattern_of(name))
            scores = nn.Parameter(initial.to(device=weight.device, dtype=weight.dtype))
            owner.register_parameter(score_name, scores)
            self.scores[name], self._owners[name] = scores, (owner, score_name)
            per_owner.setdefault(owner_path, []).append(score_name)
        for owner_path, names in per_owner.items():
            owner, hooks = pl_module.get_submodule(owner_path), _OmitScores(names)
            self._hooks += [owner.register_state_dict_post_hook(hooks),
                            owner.register_load_state_dict_pre_hook(hooks.note_absent),
                            owner.register_load_state_dict_post_hook(hooks.allow_absent)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hold the score parameters the strategy trains (FSDP2 replaced them by sharded ones, like the weights)."""
        super().on_fit_start(trainer, pl_module)
        self._score_shards = {}
        for name in self.scores:
            owner, score_name = self._owners[name]
            self.scores[name] = owner._parameters[score_name]
            shard = self.masks.shards[name]
            tile_rows = self.masks.pattern_of(name).rows
            self._score_shards[name] = group_shard(shard, tile_rows, self.scores[name].shape[0])
            if is_dtensor(self.scores[name]) != (shard is not None) or (
                    shard is not None and local(self.scores[name]).shape[0] != self._score_shards[name].rows):
                raise ValueError(f"Supermask: the scores {name + SUFFIX} are not sharded like {name}; apply "
                                 "fully_shard to the module that owns both (they are its parameters)")

    def remove_scores(self) -> None:
        """Remove the score parameters and their state-dict hooks from the model; :attr:`scores` keeps their
        values (detached) for the callback's state."""
        for owner, score_name in self._owners.values():
            if score_name in owner._parameters:
                delattr(owner, score_name)
        for handle in self._hooks:
            handle.remove()
        self.scores = {name: scores.detach() for name, scores in self.scores.items()}
        self._owners, self._hooks = {}, []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name + SUFFIX for name, scores in self.scores.items() if id(scores) not in optimized]
        if missing:
            raise ValueError(
                f"Supermask: no optimizer updates the tile scores {missing}; build the optimizer from "
                "self.parameters() in configure_optimizers (the callback registers the scores in setup)"
            )
        super().on_train_start(trainer, pl_module)

    def compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Tensor]:
        densities = self.layer_densities(step)
        ks = {name: round(densities[name] * scores.numel()) for name, scores in self.scores.items()}
        flats = {name: local(scores.detach()).reshape(-1) for name, scores in self.scores.items()}
        if self.masks.sharded:  # every layer's top-k in the same collectives
            group = next(iter(self._score_shards.values())).group
            keep = dict(zip(flats, distributed_topk_each(list(flats.values()), list(ks.values()), group), strict=True))
        else:
            keep = {name: topk_mask(flat, ks[name]) for name, flat in flats.items()}
        return {name: self.masks.pattern_of(name).expand(keep[name], tuple(self.masks.masks[name].shape))
                for name in flats}

    def effective_weight(self, name: str, weight: Tensor) -> Tensor:
        return supermask_weight(weight, local(self.scores[name]), self.masks.masks[name], self.masks.pattern_of(name))

    def local_gradients(self, dense: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """FSDP2: the weights' and the scores' gradients on the local rows and tiles (the scores' set here)."""
        out = {}
        with torch.enable_grad():
            for name, rows in dense.items():
                leaf, scores = rows.detach().requires_grad_(), local(self.scores[name]).detach().requires_grad_()
                effective = supermask_weight(leaf, scores, self.masks.masks[name], self.masks.pattern_of(name))
                out[name], grad_scores = torch.autograd.grad(effective, (leaf, scores), grads[name])
                set_local_grad(self.scores[name], grad_scores)
        return out

    @torch.no_grad()
    def bake(self, keep_training_state: bool = True) -> None:
        """Write the masked weights into the parameters, remove the hooks and the score parameters (do not step the
        optimizer afterwards: it still holds the removed scores). ``keep_training_state``: see
        :meth:`~lightning_sparse.callbacks.masked.MaskedForwardCallback.bake` (the scores are part of that state)."""
        sharded = self.masks is not None and self.masks.sharded
        super().bake(keep_training_state)
        if not sharded:
            self.remove_scores()

    def extra_state_dict(self) -> dict[str, Any]:
        """The whole scores (gathered from every shard under FSDP2 when the checkpoint is one file: every rank calls
        it); a distributed checkpoint stores them rank by rank instead (:meth:`sharded_state_tensors`)."""
        if self.saves_sharded:
            return {}
        return {"scores": {name: whole_of(local(scores.detach()), self._score_shards.get(name)).cpu().clone()
                           for name, scores in self.scores.items()}}

    def sharded_state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"scores": dict(self.scores)} if self.scores else {}

    @torch.no_grad()
    def load_sharded_state_tensors(self, kind: str, tensors: dict[str, Tensor]) -> None:
        for name, rows in tensors.items():
            local(self.scores[name].data).copy_(rows)

    @torch.no_grad()
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        if "scores" not in state and self.saves_sharded:
            return  # read rank by rank (load_sharded_state_tensors)
        stored = state.get("scores", {})
        if set(stored) != set(self.scores):
            raise ValueError(f"the checkpoint holds Supermask scores for {sorted(stored)}, not {sorted(self.scores)}")
        for name, values in stored.items():
            local(self.scores[name].data).copy_(rows_of(values, self._score_shards.get(name)))
