"""A tiny Vision Transformer (Dosovitskiy et al., 2020) for small images."""

from __future__ import annotations

import torch
from torch import nn

from lightning_sparse.models.base import ClassifierModule, check_positive_int
from lightning_sparse.models.transformer import TransformerBlock


class TinyViT(ClassifierModule):
    """Linear patch embedding, cls token, learned positions, pre-norm blocks, LayerNorm and a linear head.

    Paper: https://arxiv.org/abs/2010.11929. Patches are flattened channel-major (``C * p * p`` values)
    and embedded by ``patch_embed`` (an ``nn.Linear``); blocks are :class:`TransformerBlock`.

    Args:
        image_size: height and width of the (square) input images.
        patch_size: side of the square patches; must divide ``image_size``.
        in_channels: channels of the input images.
        num_classes: number of classes.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        scheduler: ``None`` or ``"cosine"``.

    Raises:
        ValueError: if ``patch_size`` does not divide ``image_size``, ``heads`` does not divide ``dim``, a size is
            not a positive integer, or an optimizer argument is invalid.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import FashionMNISTDataModule
        from lightning_sparse.models import TinyViT

        trainer = Trainer(max_epochs=5)
        trainer.fit(TinyViT(patch_size=7), datamodule=FashionMNISTDataModule())
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = "cosine",
    ) -> None:
        super().__init__(num_classes, optimizer, lr, weight_decay, momentum, scheduler)
        self.save_hyperparameters()
        check_positive_int(image_size=image_size, patch_size=patch_size, in_channels=in_channels, depth=depth)
        if image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size, got patch_size={patch_size}, image_size={image_size}")
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Splits images ``(B, C, H, W)`` into ``(B, H*W/p^2, C*p*p)`` patches, row-major, channel-major inside."""
        b, c, h, w = x.shape
        p = self.patch_size
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, in_channels, image_size, image_size)``."""
        b = x.shape[0]
        tokens = self.patch_embed(self.patchify(x))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))
