"""Masks for a set of layers at given densities: per layer, or one global top-k over all of them.

Example::

    >>> import torch
    >>> from lightning_sparse.core.patterns import Unstructured
    >>> scores = {"a": torch.tensor([4.0, 3.0]), "b": torch.tensor([2.0, 1.0])}
    >>> masks = select_masks(scores, {"a": 0.5, "b": 0.5}, Unstructured(), global_density=0.5)
    >>> {name: mask.tolist() for name, mask in masks.items()}
    {'a': [True, True], 'b': [False, False]}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.patterns import NM, Pattern


def select_masks(
    scores: Mapping[str, Tensor],
    densities: Mapping[str, float],
    pattern: Pattern | Mapping[str, Pattern],
    global_density: float | None = None,
    fixed: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Tensor]:
    """Boolean masks keeping the top scores of each layer.

    Args:
        scores: layer name -> score tensor of the weight's shape.
        densities: layer name -> density (used for every layer when ``global_density`` is None, and for
            the ``fixed`` layers otherwise).
        pattern: the grouping; densities count groups (blocks) or elements per group (N:M). A mapping gives each
            layer its own (the same pattern in each weight's stored layout, see ``Pattern.for_layout``).
        global_density: when set, the non-fixed layers share one budget of
            ``round(global_density * total_groups)`` groups, chosen by one top-k over all their groups.
        fixed: layers that keep their own density even under a global budget.

    Raises:
        ValueError: when a global budget is asked for an N:M pattern.
    """
    patterns = pattern if isinstance(pattern, Mapping) else dict.fromkeys(scores, pattern)
    per_layer = [name for name in scores if global_density is None or name in fixed]
    masks = {name: patterns[name].topk_mask(scores[name], densities[name]) for name in per_layer}
    pooled = [name for name in scores if name not in masks]
    if pooled:
        if any(isinstance(patterns[name], NM) for name in pooled):
            raise ValueError(f"distribution 'global' cannot be used with the N:M pattern {patterns[pooled[0]]}; "
                             "use 'uniform'")
        groups = [patterns[name].group_scores(scores[name]).float() for name in pooled]
        total = sum(group.numel() for group in groups)
        pooled_scores = torch.cat([group.to(groups[0].device) for group in groups])
        flat_mask = topk_mask(pooled_scores, round(global_density * total))
        for name, chunk in zip(pooled, torch.split(flat_mask, [g.numel() for g in groups]), strict=True):
            masks[name] = patterns[name].expand(chunk.to(scores[name].device), scores[name].shape)
    return {name: masks[name] for name in scores}
