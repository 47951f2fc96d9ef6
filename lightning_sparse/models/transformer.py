"""A pre-norm transformer block on ``nn.MultiheadAttention``, shared by ``TinyViT`` and ``CharGPT``."""

from __future__ import annotations

import torch
from torch import nn

from lightning_sparse.models.base import check_positive_int


class TransformerBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with standard parameter names.

    Parameters are ``norm1.*``, ``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj.weight``,
    ``attn.out_proj.bias``, ``norm2.*``, ``mlp.0.weight`` / ``mlp.0.bias`` (expand) and ``mlp.2.weight`` /
    ``mlp.2.bias`` (project back), so sparse-training globs like ``*.mlp.*.weight`` find them.

    Args:
        dim: token width.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.

    Raises:
        ValueError: if an argument is not a positive integer or ``heads`` does not divide ``dim``.

    Example::

        import torch
        from lightning_sparse.models.transformer import TransformerBlock

        block = TransformerBlock(dim=64, heads=4)
        y = block(torch.randn(2, 16, 64))  # (2, 16, 64)
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        check_positive_int(dim=dim, heads=heads, mlp_ratio=mlp_ratio)
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the block to ``x`` of shape ``(B, T, dim)``; ``attn_mask`` True where attention is blocked."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))
