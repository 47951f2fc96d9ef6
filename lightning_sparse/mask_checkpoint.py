"""Masks of FSDP2 shards in Lightning's distributed checkpoints: bit-packed, written and read by every rank.

Under ``ModelParallelStrategy(save_distributed_checkpoint=True)`` (its default) Lightning writes the model's and
optimizers' state with ``torch.distributed.checkpoint`` (every rank writes its shards) but the callbacks' state to
``meta.pt`` from rank 0 alone. Masks placed there would be gathered whole on rank 0. Instead each rank adds its local
rows of every mask, bit-packed (one bit per weight, rows padded to whole bytes) as a ``DTensor`` sharded like the
weight, to the checkpoint's ``state_dict`` under ``lightning_sparse.masks.<tag>.<name>``; the callback's state in
``meta.pt`` holds only a reference (:func:`reference`: the tag and the masks' shapes). On resume each rank reads its own
rows back (:func:`load_sharded`), resharded by ``torch.distributed.checkpoint`` if the number of ranks changed.
Lightning loads the model from the checkpoint's keys the model has, so the extra keys are left alone.

To resume such a checkpoint on one device, :func:`consolidate` (``python -m lightning_sparse.consolidate DIR``)
writes one file the way Lightning's ``consolidate_checkpoint`` does, with the masks moved out of ``state_dict`` into
each callback's state.

Example::

    >>> import torch
    >>> mask = torch.tensor([[True, False, True], [False, False, True]])
    >>> pack_bits(mask).tolist()
    [[5], [4]]
    >>> torch.equal(unpack_bits(pack_bits(mask), (2, 3)), mask)
    True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.distributed import Shard, is_dtensor

MASKS_KEY = "lightning_sparse.masks"
SHARDED = "sharded_masks"
PACKED = "packed_masks"
_BITS = torch.arange(8, dtype=torch.uint8)


def _row_size(shape: tuple[int, ...]) -> int:
    """Elements per row (dim 0) of a tensor of ``shape``."""
    return math.prod(shape[1:])


def pack_bits(mask: Tensor) -> Tensor:
    """``(rows, ...)`` bool -> ``(rows, ceil(columns / 8))`` uint8, column ``8 b + j`` in bit ``j`` of byte ``b``."""
    flat = mask.reshape(mask.shape[0], _row_size(tuple(mask.shape))).to(torch.uint8)  # 0 rows: a rank without any
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], dim=1)
    bits = flat.reshape(flat.shape[0], flat.shape[1] // 8, 8) << _BITS.to(flat.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The bool mask of ``shape`` that :func:`pack_bits` packed."""
    columns = _row_size(shape)
    bits = (packed.unsqueeze(-1) >> _BITS.to(packed.device)) & 1
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :columns].bool().reshape(shape)


def packed_columns(shape: tuple[int, ...]) -> int:
    """Bytes per row of a packed mask of ``shape``."""
    return -(-_row_size(shape) // 8)


def tag_of(state_key: str) -> str:
    """A short, stable name for a callback's state key (state keys hold braces, quotes and spaces)."""
    return hashlib.sha1(state_key.encode()).hexdigest()[:12]


def mask_key(tag: str, name: str) -> str:
    return f"{MASKS_KEY}.{tag}.{name}"


def reference(tag: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What a callback's state holds in place of its masks: where they are and their whole shapes."""
    return {SHARDED: tag, "shapes": {name: list(shape) for name, shape in shapes.items()}}


def is_reference(state: Any) -> bool:
    return isinstance(state, Mapping) and SHARDED in state


def is_packed(state: Any) -> bool:
    return isinstance(state, Mapping) and PACKED in state


def _as_dtensor(local_rows: Tensor, param: Any, shape: tuple[int, int]) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_rows, param.device_mesh, param.placements, shape=shape, stride=(shape[1], 1),
                              run_check=False)


def _row_buffer(param: Any, shard: Shard, columns: int, dtype: torch.dtype) -> Any:
    """An empty ``DTensor`` of ``(rows, columns)`` sharded like ``param``'s rows: this rank's rows to read into."""
    return _as_dtensor(torch.empty(shard.rows, columns, dtype=dtype), param, (param.shape[0], columns))


def _read(path: str | Path, buffers: Mapping[str, Any]) -> None:
    """Read ``buffers`` (keys of the checkpoint's ``state_dict``) in place from the distributed checkpoint ``path``."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"state_dict": dict(buffers)}, checkpoint_id=str(path))


def sharded_entries(tag: str, masks: Mapping[str, Tensor], params: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` entries for this rank's rows of each mask: bit-packed ``DTensor`` s sharded like the weights."""
    entries = {}
    for name, mask in masks.items():
        shape = (params[name].shape[0], packed_columns(tuple(params[name].shape)))
        entries[mask_key(tag, name)] = _as_dtensor(pack_bits(mask.cpu()), params[name], shape)
    return entries


def load_sharded(path: str | Path, state: Mapping[str, Any], params: Mapping[str, Any],
                 shards: Mapping[str, Shard]) -> dict[str, Tensor]:
    """This rank's rows of each mask that :func:`sharded_entries` wrote into the distributed checkpoint ``path``."""
    tag = state[SHARDED]
    buffers = {name: _row_buffer(param, shards[name], packed_columns(tuple(param.shape)), torch.uint8)
               for name, param in params.items()}
    _read(path, {mask_key(tag, name): b for name, b in buffers.items()})
    return {name: unpack_bits(buffers[name].to_local(), (shards[name].rows, *params[name].shape[1:]))
            for name in params}


TENSORS = "sharded_tensors"


def tensor_key(tag: str, kind: str, name: str) -> str:
    return f"{MASKS_KEY}.{tag}.{kind}.{name}"


def tensor_reference(tag: str, kind: str, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> dict[str, Any]:
    """What a callback's state holds in place of per-weight tensors (``kind``: e.g. ``"momentum"``) that live beside
    the shards: where they are, their dtype and whole shapes."""
    return {TENSORS: tag, "kind": kind, "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
            "shapes": {name: list(t.shape if is_dtensor(t) else params[name].shape) for name, t in tensors.items()}}


def is_tensor_reference(state: Any) -> bool:
    return isinstance(state, Mapping) and TENSORS in state


def tensor_entries(tag: str, kind: str, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` entries for this rank's rows of per-weight tensors, as ``DTensor`` s sharded like the weights (a
    ``DTensor`` of its own, such as Supermask's tile scores, as it is)."""
    entries = {}
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            entries[tensor_key(tag, kind, name)] = tensor.detach()
            continue
        shape = (params[name].shape[0], _row_size(params[name].shape))
        rows = tensor.detach().reshape(tensor.shape[0], shape[1]).cpu()
        entries[tensor_key(tag, kind, name)] = _as_dtensor(rows, params[name], shape)
    return entries


def load_tensors(path: str | Path, state: Mapping[str, Any], params: Mapping[str, Any],
                 shards: Mapping[str, Shard], templates: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """This rank's rows of the tensors a :func:`tensor_reference` points to, read from the checkpoint ``path``
    (``templates``: the live tensors; a ``DTensor`` among them is read in its own sharding)."""
    tag, kind, dtype = state[TENSORS], state["kind"], getattr(torch, state["dtype"])
    own = {name for name, t in (templates or {}).items() if is_dtensor(t)}
    buffers = {name: torch.empty_like(templates[name].detach()) if name in own else
               _row_buffer(params[name], shards[name], _row_size(tuple(params[name].shape)), dtype)
               for name in state["shapes"]}
    _read(path, {tensor_key(tag, kind, n): b for n, b in buffers.items()})
    return {name: b.to_local() if name in own else b.to_local().reshape(shards[name].rows, *params[name].shape[1:])
            for name, b in buffers.items()}


def inline_masks(checkpoint: dict[str, Any]) -> int:
    """Move the masks of a loaded distributed checkpoint (a plain dict, as Lightning's consolidation reads it) out of
    ``state_dict`` into each callback's state, as whole packed masks; returns how many callbacks held some."""
    model = checkpoint.get("state_dict", {})
    moved = 0
    for state in (checkpoint.get("callbacks") or {}).values():
        if not (isinstance(state, dict) and is_reference(state.get("masks"))):
            continue
        tag, shapes = state["masks"][SHARDED], state["masks"]["shapes"]
        state["masks"] = {PACKED: {name: model.pop(mask_key(tag, name)) for name in shapes}, "shapes": shapes}
        for key, value in list(state.items()):  # other per-weight tensors: whole, as one process keeps them
            if isinstance(value, Mapping) and TENSORS in value:
                state[key] = {name: model.pop(tensor_key(value[TENSORS], value["kind"], name)).reshape(shape)
                              for name, shape in value["shapes"].items()}
        moved += 1
    return moved


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the distributed checkpoint folder ``path`` as one file (default ``<path>.consolidated``) that resumes on
    one device: Lightning's consolidation, with the masks moved into the callbacks' state.

    Raises:
        ValueError: when ``path`` is not a distributed checkpoint folder.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    path = Path(path)
    if not (path.is_dir() and (path / "meta.pt").is_file()):
        raise ValueError(f"path must be a distributed checkpoint folder (with meta.pt), got {str(path)!r}")
    checkpoint = _load_distributed_checkpoint(path)  # with meta.pt's keys
    if "optimizer_states" not in checkpoint:  # Lightning's layout: a list of the optimizers' states
        keys = sorted(k for k in checkpoint if k.startswith("optimizer_") and k[len("optimizer_"):].isdigit())
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in keys]
    inline_masks(checkpoint)
    out = Path(out) if out is not None else path.with_name(f"{path.name}.consolidated")
    torch.save(checkpoint, out)
    return out
