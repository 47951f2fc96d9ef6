"""Sparsity patterns: which groups of weights are kept or dropped together.

A pattern maps a weight tensor to *groups* and back. Weights of any rank are viewed as a matrix
``(out_features, -1)`` (a Conv weight ``(out, in, kh, kw)`` becomes ``(out, in * kh * kw)``), so the
pattern always runs along the input dimension.

* :class:`Unstructured`: every element is its own group.
* :class:`Blocks`: ``R x C`` tiles of that matrix; a block is kept or dropped whole. Densities count
  blocks.
* :class:`NM`: at most ``n`` kept elements in every run of ``m`` consecutive input elements. Densities
  count elements per group: a density ``d`` keeps ``round(d * m)`` per group, and the final density must
  be ``n / m``.

Example::

    >>> import torch
    >>> pattern = parse_pattern("2:4")
    >>> mask = pattern.topk_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), density=0.5)
    >>> mask.int().tolist()
    [[1, 0, 1, 0]]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_sparse.core.masks import topk_mask

_BLOCK_RE = re.compile(r"^(\d+)x(\d+)$")
_NM_RE = re.compile(r"^(\d+):(\d+)$")
PATTERN_HELP = "'unstructured', 'RxC' blocks such as '4x4' or '32x32', or 'N:M' such as '2:4'"


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most`` (1 at least).

    Example::

        >>> largest_divisor(64, 7), largest_divisor(48, 32), largest_divisor(7, 3)
        (4, 24, 1)
    """
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def as_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix view of a weight shape (cols = product of the trailing dims)."""
    rows = shape[0] if len(shape) else 1
    cols = 1
    for dim in shape[1:]:
        cols *= dim
    return rows, cols


@dataclass(frozen=True)
class Unstructured:
    """Every element is its own group."""

    def __str__(self) -> str:
        return "unstructured"

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Every shape is allowed."""

    def for_layout(self, transposed: bool) -> Unstructured:
        """The same pattern on a weight stored ``(in, out)`` (elements do not care)."""
        return self

    def num_groups(self, shape: tuple[int, ...]) -> int:
        """Number of groups (here: elements)."""
        return int(torch.Size(shape).numel())

    def group_scores(self, scores: Tensor) -> Tensor:
        """Scores per group, flattened."""
        return scores.reshape(-1)

    def expand(self, group_mask: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Element mask of ``shape`` from a flat group mask."""
        return group_mask.reshape(shape)

    def compress(self, mask: Tensor) -> Tensor:
        """Flat group mask from an element mask (inverse of :meth:`expand`)."""
        return mask.reshape(-1)

    def topk_mask(self, scores: Tensor, density: float) -> Tensor:
        """Keep exactly ``round(density * numel)`` highest-scoring elements."""
        return topk_mask(scores, round(density * scores.numel()))


@dataclass(frozen=True)
class Blocks:
    """``rows x cols`` tiles of the weight's matrix view, kept or dropped whole."""

    rows: int
    cols: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when the block does not tile the weight."""
        n_rows, n_cols = as_matrix_shape(shape)
        if n_rows % self.rows or n_cols % self.cols:
            fitting = self.fitting(n_rows, n_cols)
            example = f" (e.g. pattern '{fitting}')" if fitting else ""
            raise ValueError(
                f"pattern {self} does not divide {name} of shape {tuple(shape)} (matrix view {n_rows}x{n_cols}); "
                f"choose a block whose sides divide {n_rows} and {n_cols}{example}, or exclude {name!r}"
            )

    def fitting(self, n_rows: int, n_cols: int) -> Blocks | None:
        """The largest block no bigger than this one that tiles an ``n_rows x n_cols`` matrix (square when this one
        is); None when only 1x1 does.

        Example::

            >>> Blocks(7, 7).fitting(64, 48), Blocks(32, 8).fitting(48, 64)
            (Blocks(rows=4, cols=4), Blocks(rows=24, cols=8))
        """
        if self.rows == self.cols:
            rows = cols = largest_divisor(math.gcd(n_rows, n_cols), self.rows)
        else:
            rows, cols = largest_divisor(n_rows, self.rows), largest_divisor(n_cols, self.cols)
        return None if rows == cols == 1 else Blocks(rows, cols)

    def for_layout(self, transposed: bool) -> Blocks:
        """The pattern on the stored tensor of a weight kept ``(in, out)``: the block's sides swap."""
        return Blocks(self.cols, self.rows) if transposed else self

    def num_groups(self, shape: tuple[int, ...]) -> int:
        """Number of blocks."""
        n_rows, n_cols = as_matrix_shape(shape)
        return (n_rows // self.rows) * (n_cols // self.cols)

    def _tiles(self, tensor: Tensor) -> Tensor:
        n_rows, n_cols = as_matrix_shape(tensor.shape)
        tiles = tensor.reshape(n_rows // self.rows, self.rows, n_cols // self.cols, self.cols)
        return tiles.transpose(1, 2)

    def group_scores(self, scores: Tensor) -> Tensor:
        """Mean score of each block, flattened in row-major block order."""
        return self._tiles(scores).float().mean(dim=(2, 3)).reshape(-1)

    def expand(self, group_mask: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Element mask of ``shape`` from a flat block mask."""
        n_rows, n_cols = as_matrix_shape(shape)
        grid = group_mask.reshape(n_rows // self.rows, n_cols // self.cols)
        return grid.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1).reshape(shape)

    def compress(self, mask: Tensor) -> Tensor:
        """Flat block mask from an element mask (a block is kept if any element is)."""
        return self._tiles(mask).reshape(*self._tiles(mask).shape[:2], -1).any(-1).reshape(-1)

    def topk_mask(self, scores: Tensor, density: float) -> Tensor:
        """Keep exactly ``round(density * num_blocks)`` blocks with the highest mean score."""
        groups = self.group_scores(scores)
        return self.expand(topk_mask(groups, round(density * groups.numel())), scores.shape)


@dataclass(frozen=True)
class NM:
    """At most ``n`` kept elements in every ``m`` consecutive elements along the input dimension.

    ``transposed`` (see :meth:`for_layout`): the weight is stored ``(in, out)`` (HF ``Conv1D``), so the groups run
    along its first dimension. It does not change :meth:`__str__`.
    """

    n: int
    m: int
    transposed: bool = field(default=False, repr=False)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        """The density the pattern implies, ``n / m``."""
        return self.n / self.m

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when ``m`` does not divide the weight's input dimension."""
        n_cols = shape[0] if self.transposed else as_matrix_shape(shape)[1]
        if n_cols % self.m:
            fitting = self.fitting(n_cols)
            example = f" (e.g. pattern '{fitting}', the same density)" if fitting else ""
            raise ValueError(
                f"pattern {self} needs the input dimension of {name} (shape {tuple(shape)}, {n_cols} inputs) "
                f"to be divisible by m={self.m}; exclude {name!r} or choose another pattern{example}"
            )

    def fitting(self, n_cols: int) -> NM | None:
        """The N:M pattern of the same density with the largest ``m`` no bigger than this one's that divides
        ``n_cols`` inputs; None when there is none.

        Example::

            >>> NM(2, 4).fitting(6), NM(2, 4).fitting(9)
            (NM(n=1, m=2), None)
        """
        step = self.m // math.gcd(self.n, self.m)
        ms = [m for m in range(step, self.m + 1, step) if n_cols % m == 0]
        return NM(self.n * ms[-1] // self.m, ms[-1]) if ms else None

    def for_layout(self, transposed: bool) -> NM:
        """The pattern on the stored tensor of a weight kept ``(in, out)``: groups along its first dimension."""
        return NM(self.n, self.m, bool(transposed))

    def num_groups(self, shape: tuple[int, ...]) -> int:
        """Number of ``m``-element groups."""
        return int(torch.Size(shape).numel()) // self.m

    def group_scores(self, scores: Tensor) -> Tensor:
        """Scores as ``(groups, m)``."""
        return (scores.t() if self.transposed else scores).reshape(-1, self.m)

    def expand(self, group_mask: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Element mask of ``shape`` from a ``(groups, m)`` mask."""
        if self.transposed:
            return group_mask.reshape(shape[1], shape[0]).t().contiguous()
        return group_mask.reshape(shape)

    def compress(self, mask: Tensor) -> Tensor:
        """``(groups, m)`` view of an element mask."""
        return (mask.t() if self.transposed else mask).reshape(-1, self.m)

    def keep_per_group(self, density: float) -> int:
        """Elements kept per group at ``density``: ``round(density * m)``, at least ``n``."""
        return max(self.n, min(self.m, round(density * self.m)))

    def topk_mask(self, scores: Tensor, density: float) -> Tensor:
        """Keep the ``keep_per_group(density)`` highest scores of every group (ties: lower index first)."""
        groups = self.group_scores(scores).float()
        keep = self.keep_per_group(density)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :keep]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        return self.expand(mask, tuple(scores.shape))


Pattern = Unstructured | Blocks | NM


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Build a pattern from ``"unstructured"``, ``"RxC"`` or ``"N:M"`` (or return a pattern unchanged).

    Raises:
        ValueError: for any other string, zero sizes, or ``n >= m``.
        TypeError: when ``pattern`` is not a string or a pattern.
    """
    if isinstance(pattern, Unstructured | Blocks | NM):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string ({PATTERN_HELP}), got {type(pattern).__name__}: {pattern!r}")
    text = pattern.strip().lower()
    if text == "unstructured":
        return Unstructured()
    if match := _BLOCK_RE.match(text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise ValueError(f"pattern block sides must be >= 1, got {pattern!r}")
        return Blocks(rows, cols)
    if match := _NM_RE.match(text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
        return NM(n, m)
    raise ValueError(f"pattern must be {PATTERN_HELP}, got {pattern!r}")
