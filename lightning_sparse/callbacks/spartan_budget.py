"""One Spartan budget (a layer, or every pooled layer of a global budget): its soft threshold, its exact hard top-k
and the threshold node that carries the budget's coupling term of the implicit gradient."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sparse.core.masks import topk_threshold
from lightning_sparse.core.patterns import Pattern, Unstructured
from lightning_sparse.core.soft_mask import group_magnitudes, hard_topk, soft_topk_threshold, threshold_node

HINT_MARGIN = 0.02  # the hard top-k selects among the entries within (1 -+ this) x the previous k-th value


@dataclass
class Budget:
    """A solved budget: the soft threshold ``t`` and sharpness of the weights ``names`` (state), the last hard
    top-k value (a hint for the next selection) and the threshold's tensors (never pickled or checkpointed)."""

    names: tuple[str, ...]
    threshold: float
    sharpness: float
    value: Tensor | None = field(default=None, repr=False)  # the threshold as a float32 tensor on the weights' device
    node: Tensor | None = field(default=None, repr=False)  # the shared threshold node (graph; never pickled)
    kth: float | None = None  # the hard top-k's last kept value: a hint for the next selection (not state)
    before: float | None = None  # the threshold one solve earlier (state: it shapes the next solve's start)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "node": None}

    def to_state(self) -> dict[str, Any]:
        return {"names": list(self.names), "threshold": self.threshold, "sharpness": self.sharpness,
                "before": self.before}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Budget:
        before = state.get("before")  # absent in checkpoints written before it was kept
        return cls(tuple(state["names"]), float(state["threshold"]), float(state["sharpness"]),
                   before=None if before is None else float(before))

    def threshold_tensor(
        self, params: Mapping[str, Tensor], pattern: Pattern, costs: Mapping[str, float], graph: bool
    ) -> Tensor:
        """The threshold: the shared node when a graph is being built, else a constant tensor."""
        weights = [params[n] for n in self.names]
        if self.value is None:
            self.value = torch.tensor(self.threshold, dtype=torch.float32, device=weights[0].device)
        if not graph:
            return self.value
        if self.node is None:
            self.node = threshold_node(weights, pattern, self.threshold, self.sharpness, [costs[n] for n in self.names])
        return self.node


@torch.no_grad()
def solve_budget(
    params: Mapping[str, Tensor],
    names: Sequence[str],
    pattern: Pattern,
    costs: Mapping[str, float],
    density: float,
    sharpness: float,
    previous: Budget | None,
) -> tuple[Budget, dict[str, Tensor]]:
    """Soft threshold and exact hard top-k of the weights ``names``; the previous budget starts both searches.

    Returns the budget and the hard mask of each weight (bool, the weight's shape).
    """
    flat, sizes = _pooled_magnitudes([params[n] for n in names], pattern)
    cost = None
    if any(costs[n] != 1.0 for n in names):
        cost = torch.cat([torch.full((k,), costs[n], device=flat.device) for n, k in zip(names, sizes, strict=True)])
    threshold = soft_topk_threshold(flat, density, sharpness, cost, _guess(previous))
    hard, kth = _hard_topk(flat, density, cost, previous)
    chunks = torch.split(hard, sizes)
    masks = {n: pattern.expand(c, params[n].shape) for n, c in zip(names, chunks, strict=True)}
    before = None if previous is None else previous.threshold
    return Budget(tuple(names), threshold, sharpness, kth=kth, before=before), masks


def _guess(previous: Budget | None) -> float | None:
    """Where the soft-threshold search starts: the last threshold moved on by the last step's change (the threshold
    drifts steadily as the weights train: 2 passes over the data per solve instead of 3 after the density ramp).
    Any start gives a threshold within the same tolerance; the start is checkpointed so a resumed run repeats it."""
    if previous is None or not math.isfinite(previous.threshold):
        return None
    if previous.before is None or not math.isfinite(previous.before):
        return previous.threshold
    return 2 * previous.threshold - previous.before


def _pooled_magnitudes(weights: Sequence[Tensor], pattern: Pattern) -> tuple[Tensor, list[int]]:
    """The group magnitudes of every weight in one flat float32 tensor (on the first weight's device), and each
    weight's number of groups. Unstructured float32 weights write ``|w|`` straight into it (no per-layer copies)."""
    device = weights[0].device
    direct = isinstance(pattern, Unstructured) and all(w.dtype == torch.float32 for w in weights)
    sizes = [pattern.num_groups(tuple(w.shape)) for w in weights]
    if len(weights) == 1:
        return group_magnitudes(weights[0], pattern), sizes
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    for weight, chunk in zip(weights, torch.split(flat, sizes), strict=True):
        if direct and weight.device == device:
            torch.abs(weight.detach().reshape(-1), out=chunk)
        else:
            chunk.copy_(group_magnitudes(weight, pattern))
    return flat, sizes


def _hard_topk(
    flat: Tensor, density: float, costs: Tensor | None, previous: Budget | None
) -> tuple[Tensor, float | None]:
    """The exact hard top-k; it selects within a band around the previous step's k-th value when there is one."""
    if density == 1:
        return torch.ones_like(flat, dtype=torch.bool), None
    if costs is not None:
        return hard_topk(flat, density, costs), None
    bracket = None
    if previous is not None and previous.kth is not None:
        margin = HINT_MARGIN * abs(previous.kth)
        bracket = (previous.kth - margin, previous.kth + margin)
    return topk_threshold(flat, round(density * flat.numel()), bracket)
