"""scikit-learn's bundled 8x8 digits: the fastest real dataset for smoke tests (no download)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse._checks import check_positive_int
from lightning_sparse.data._checks import check_fractions


class DigitsDataModule(L.LightningDataModule):
    """The 1797 8x8 handwritten digits of ``sklearn.datasets.load_digits`` as ``(N, 1, 8, 8)`` floats in [0, 1].

    The train / val / test splits come from one permutation seeded with ``seed``; the training loader
    shuffles with a generator seeded with ``seed``.

    Args:
        batch_size: batch size of every loader.
        val_fraction: fraction of the images in the validation split, in (0, 1).
        test_fraction: fraction of the images in the test split, in (0, 1).
        seed: seeds the splits and the training shuffle.

    Raises:
        ValueError: if ``batch_size`` is not a positive integer or the fractions are out of range.
        ImportError: in ``setup``, if scikit-learn is not installed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import DigitsDataModule
        from lightning_sparse.models import MLP

        trainer = Trainer(max_epochs=5)
        trainer.fit(MLP(input_shape=(1, 8, 8), hidden=(128,)), datamodule=DigitsDataModule())
    """

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0):
        super().__init__()
        check_positive_int(batch_size=batch_size)
        check_fractions(val_fraction, test_fraction)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Loads and splits the digits once; later calls do nothing."""
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "DigitsDataModule needs scikit-learn: `pip install scikit-learn` "
                "(or `pip install lightning-sparse[data]`)"
            ) from err
        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(y)
        n_val, n_test = max(1, round(self.val_fraction * n)), max(1, round(self.test_fraction * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, test_idx, train_idx = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
