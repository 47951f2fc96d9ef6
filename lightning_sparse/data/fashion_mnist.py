"""Fashion-MNIST from the standard IDX files on disk (Debian's ``dataset-fashion-mnist``); never downloads."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse._checks import check_positive_int
from lightning_sparse.data.idx import read_idx

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530  # pixel mean / std of the 60000 training images scaled to [0, 1]


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST (Xiao et al., 2017, https://arxiv.org/abs/1708.07747) as normalised float tensors.

    ``setup`` loads the four IDX files once into memory; images are ``(N, 1, 28, 28)`` float32 standardised
    with the training-set mean and std, labels int64. The validation split is ``val_size`` images of the
    training file chosen by a permutation seeded with ``seed``; the test split is the t10k file.

    Args:
        data_dir: directory holding the four ``*-ubyte.gz`` files.
        batch_size: batch size of every loader.
        val_size: number of training images held out for validation.
        num_workers: DataLoader worker processes.
        seed: seeds the validation split and the training shuffle.
        limit_train: if set, keep only this many training images (fast tests).

    Raises:
        ValueError: if ``batch_size``, ``val_size`` or ``limit_train`` is not a positive integer,
            ``num_workers`` is negative, or (in ``setup``) ``val_size`` leaves no training images.
        FileNotFoundError: in ``setup``, if the directory or one of the files is missing.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import FashionMNISTDataModule
        from lightning_sparse.models import SmallCNN

        dm = FashionMNISTDataModule(batch_size=128)
        trainer = Trainer(max_epochs=3)
        trainer.fit(SmallCNN(), datamodule=dm)
    """

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(
        self,
        data_dir: str = "/usr/share/datasets/fashion-mnist",
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(batch_size=batch_size, val_size=val_size)
        if limit_train is not None:
            check_positive_int(limit_train=limit_train)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = Path(os.path.expanduser(data_dir))
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.limit_train = limit_train
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _paths(self) -> dict[str, Path]:
        paths = {key: self.data_dir / name for key, name in FILES.items()}
        missing = [p.name for p in paths.values() if not p.is_file()]
        if missing:
            what = "directory does not exist" if not self.data_dir.is_dir() else f"missing {', '.join(missing)}"
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {self.data_dir} ({what}); expected the files "
                f"{', '.join(FILES.values())}. Install them with `sudo apt-get install dataset-fashion-mnist` "
                f"or pass data_dir= a directory holding them."
            )
        return paths

    def setup(self, stage: str | None = None) -> None:
        """Loads and splits the data once; later calls do nothing."""
        if self.train_set is not None:
            return
        paths = self._paths()
        images, labels = _load_pair(paths["train_images"], paths["train_labels"])
        if self.val_size >= len(labels):
            raise ValueError(f"val_size must be smaller than the {len(labels)} training images, got {self.val_size}")
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train_idx = perm[self.val_size :][: self.limit_train]
        val_idx = perm[: self.val_size]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(*_load_pair(paths["test_images"], paths["test_labels"]))

    def _loader(self, dataset: TensorDataset | None, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


def _load_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"expected images (N, H, W) and labels (N,), got {images.shape} in {images_path.name} "
            f"and {labels.shape} in {labels_path.name}"
        )
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)
    return x, torch.from_numpy(labels).long()
