"""Bundled LightningModules: MLP, SmallCNN, TinyViT (classifiers) and CharGPT (byte-level language model)."""

from lightning_sparse.models.base import ClassifierModule, build_optimizer
from lightning_sparse.models.cnn import SmallCNN
from lightning_sparse.models.gpt import CharGPT
from lightning_sparse.models.mlp import MLP
from lightning_sparse.models.transformer import TransformerBlock
from lightning_sparse.models.vit import TinyViT

__all__ = [
    "MLP",
    "CharGPT",
    "ClassifierModule",
    "SmallCNN",
    "TinyViT",
    "TransformerBlock",
    "build_optimizer",
]
