"""Bundled datamodules: Fashion-MNIST (IDX files on disk), scikit-learn digits, Python stdlib source text."""

from lightning_sparse.data.digits import DigitsDataModule
from lightning_sparse.data.fashion_mnist import FashionMNISTDataModule
from lightning_sparse.data.idx import parse_idx, read_idx
from lightning_sparse.data.python_source import PythonSourceDataModule, TokenWindows, stdlib_source

__all__ = [
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "PythonSourceDataModule",
    "TokenWindows",
    "parse_idx",
    "read_idx",
    "stdlib_source",
]
