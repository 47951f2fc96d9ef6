"""What an export did, in words, and the pattern it uses when none is given: the one the training used.

Example::

    >>> export_pattern("64x9"), export_pattern("2:4"), export_pattern("1:4"), export_pattern("unstructured")
    ('64x9', '2:4', '2:4', None)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lightning_sparse.export.manifest import SPARSE_FILE, Manifest

__all__ = [
    "FALLBACK_PATTERN",
    "NoSparseLayerError",
    "default_pattern",
    "export_pattern",
    "no_sparse_reason",
    "stored_line",
    "training_layer_patterns",
    "training_patterns",
]

FALLBACK_PATTERN = "32x32"
_STATE_PATTERN = re.compile(r"'pattern': '([^']+)'")
_BLOCKS = re.compile(r"\d+x\d+")
_NM = re.compile(r"(\d+):4")


class NoSparseLayerError(ValueError):
    """An export asked to store at least one layer sparse (``require_sparse``) would store none."""


def export_pattern(training: str) -> str | None:
    """The export pattern that stores a mask trained under ``training``: blocks as themselves, N:4 with N <= 2 as
    ``"2:4"`` (at most 2 of every 4 kept fits 2:4 storage); None for a pattern no export format follows
    (unstructured, other N:M)."""
    if _BLOCKS.fullmatch(training):
        return training
    nm = _NM.fullmatch(training)
    return "2:4" if nm and 1 <= int(nm.group(1)) <= 2 else None


def training_layer_patterns(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """Parameter FQN -> the export pattern that stores the mask its sparsity callback trained (see
    :func:`export_pattern`; layers under a pattern no export format follows are left out)."""
    found = {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        match = _STATE_PATTERN.search(key) if isinstance(key, str) else None
        masks = state.get("masks") if isinstance(state, Mapping) else None
        chosen = export_pattern(match.group(1)) if match else None
        if chosen and masks:
            names = masks["shapes"] if isinstance(masks, Mapping) and "shapes" in masks else masks
            found.update(dict.fromkeys(names, chosen))
    return found


def same_format(pattern: str, layer_patterns: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``layer_patterns`` an export in ``pattern`` can store (blocks beside blocks, 2:4 beside 2:4).

    >>> same_format("32x32", {"a.weight": "64x9", "b.weight": "2:4"})
    {'a.weight': '64x9'}
    """
    blocks = bool(_BLOCKS.fullmatch(pattern))
    return {name: own for name, own in layer_patterns.items() if bool(_BLOCKS.fullmatch(own)) == blocks}


def training_patterns(checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """Pattern -> number of weights the checkpoint's sparsity callbacks masked under it (read from their state keys,
    ``MagnitudePruning{'pattern': '64x9', ...}``, and the masks their states hold)."""
    weights, counts = checkpoint.get("state_dict") or {}, {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        found = _STATE_PATTERN.search(key) if isinstance(key, str) else None
        masks = state.get("masks") if isinstance(state, Mapping) else None
        if found and masks:
            numel = sum(weights[name].numel() for name in masks if name in weights)
            counts[found.group(1)] = counts.get(found.group(1), 0) + numel
    return counts


def default_pattern(checkpoint: Mapping[str, Any]) -> tuple[str, str]:
    """The export pattern for ``checkpoint`` and why: the training's pattern (of the most weights when the callbacks
    used several), else :data:`FALLBACK_PATTERN`."""
    counts = training_patterns(checkpoint)
    if not counts:
        return FALLBACK_PATTERN, f"no sparsity callback state in the checkpoint: {FALLBACK_PATTERN} blocks"
    training = max(counts, key=counts.get)
    used = ", ".join(f"{pattern} ({numel} weights)" for pattern, numel in counts.items())
    chosen = export_pattern(training)
    if chosen is None:
        return FALLBACK_PATTERN, f"training used {used}, which no export format follows: {FALLBACK_PATTERN} blocks"
    return chosen, f"the training's pattern (training used {used})"


def _dense_bytes(manifest: Manifest, entry: Mapping[str, Any]) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, manifest.dtype)).element_size()
    return int(torch.Size(entry["shape"]).numel()) * itemsize


def _stored_bytes(dirpath: Path) -> dict[str, int]:
    """Bytes of each converted parameter's components in ``sparse.safetensors``, by parameter FQN."""
    stored: dict[str, int] = {}
    with safe_open(dirpath / SPARSE_FILE, framework="pt") as reader:
        for key in reader.keys():  # noqa: SIM118  (a safetensors reader, not a dict)
            tensor = reader.get_tensor(key)
            param = key.rpartition(".")[0]
            stored[param] = stored.get(param, 0) + tensor.numel() * tensor.element_size()
    return stored


def stored_line(manifest: Manifest, dirpath: str | Path) -> str:
    """``"k of n layers stored sparse (x MB -> y MB)"``: the weights of the ``n`` planned layers, dense, and as
    written (converted layers by the size of their components in ``sparse.safetensors``)."""
    stored = _stored_bytes(Path(dirpath))
    dense = sum(_dense_bytes(manifest, entry) for entry in manifest.layers.values())
    after = sum(stored.get(entry["param"], 0) if entry["converted"] else _dense_bytes(manifest, entry)
                for entry in manifest.layers.values())
    count = f"{len(manifest.converted)} of {len(manifest.layers)} layers stored sparse"
    return f"{count} ({dense / 1e6:.3g} MB -> {after / 1e6:.3g} MB)"


def no_sparse_reason(pattern: str, skipped: Mapping[str, str]) -> str:
    """The message for an export that converts no layer: each reason with the layers it applies to."""
    layers_by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        layers_by_reason.setdefault(reason, []).append(name or "<root>")
    reasons = "; ".join(f"{reason} ({', '.join(names)})" for reason, names in layers_by_reason.items())
    return (f"no layer stored sparse with pattern {pattern!r}, every layer stays dense: {reasons or 'no layer'}. "
            "Train with a block or 2:4 pattern (e.g. the gmp_bsr_export recipe), or export with another --pattern")
