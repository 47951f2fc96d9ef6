"""What an export writes: CPU tensors whose zeros are exact ``+0.0``, shared tensors written once.

Masking by multiplication (``w * mask``) leaves ``-0.0`` where a negative weight was pruned (IEEE 754). It computes
the same numbers, but consumers that read the zeros' bit patterns do not: vLLM produced garbage from fp16/bf16 2:4
checkpoints that stored ``-0.0`` (vLLM PR #13198). Every file an export writes therefore holds ``+0.0`` only; the
live model is never changed.

Example::

    >>> import torch
    >>> w = torch.tensor([-1.5, 2.0]) * torch.tensor([0.0, 1.0])
    >>> torch.signbit(w).tolist(), torch.signbit(positive_zeros({"w": w})["w"]).tolist()
    ([True, False], [False, False])
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["has_negative_zero", "positive_zeros", "save_state"]

_ZERO_SIGNED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_negative_zero(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds a ``-0.0``."""
    return tensor.dtype in _ZERO_SIGNED and bool((torch.signbit(tensor) & (tensor == 0)).any())


def _storage_key(tensor: Tensor) -> tuple | int:
    """Equal for two tensors that view the same elements (tied weights appear in a ``state_dict`` once per name)."""
    if tensor.numel() == 0:
        return id(tensor)
    where = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset())
    return (*where, tuple(tensor.shape), tensor.stride(), tensor.dtype)


def positive_zeros(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` on the CPU with every ``-0.0`` written as ``+0.0``; tensors that shared elements stay one tensor.

    A tensor with a ``-0.0`` is copied (the live one is left as it is); the others are the same CPU tensors.
    """
    out: dict[str, Tensor] = {}
    done: dict[tuple | int, Tensor] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key not in done:
            cpu = tensor.detach().cpu()
            if has_negative_zero(cpu):  # -0.0 + 0.0 == +0.0; every other value is unchanged
                cpu = cpu.add_(0.0) if tensor.device.type != "cpu" else cpu + 0.0
            done[key] = cpu
        out[name] = done[key]
    return out


def save_state(state: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Writes ``state`` as safetensors with ``+0.0`` zeros, each shared tensor once (as ``safetensors``'
    ``save_model`` does: ``load_model`` restores the other names), contiguous."""
    clean = positive_zeros(state)
    kept: dict[int, str] = {}
    tensors, metadata = {}, dict(metadata or {})
    for name, tensor in clean.items():
        first = kept.setdefault(id(tensor), name)
        if first == name:
            tensors[name] = tensor.contiguous()
        else:
            metadata.setdefault(name, first)
    save_file(tensors, str(path), metadata=metadata or None)
