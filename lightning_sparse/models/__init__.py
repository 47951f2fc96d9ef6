"""Bundled LightningModules: MLP, SmallCNN, TinyViT (classifiers), CharGPT (byte-level language model) and HFCausalLM
(a Hugging Face causal LM; needs the ``[hf]`` extra to be built, not to be imported)."""

from lightning_sparse.models.base import ClassifierModule, build_optimizer
from lightning_sparse.models.cnn import SmallCNN
from lightning_sparse.models.gpt import CharGPT
from lightning_sparse.models.hf import HFCausalLM
from lightning_sparse.models.mlp import MLP
from lightning_sparse.models.transformer import TransformerBlock
from lightning_sparse.models.vit import TinyViT

__all__ = [
    "MLP",
    "CharGPT",
    "ClassifierModule",
    "HFCausalLM",
    "SmallCNN",
    "TinyViT",
    "TransformerBlock",
    "build_optimizer",
]
