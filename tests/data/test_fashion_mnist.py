from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sparse.data.fashion_mnist import FILES, MEAN, STD, FashionMNISTDataModule

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_fake_files_shapes_and_normalisation(fake_fashion_dir):
    dm = FashionMNISTDataModule(data_dir=str(fake_fashion_dir), batch_size=4, val_size=5)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    x, y = dm.train_set.tensors
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x.min(), torch.tensor((0 - MEAN) / STD), atol=1e-5)  # 20 random images hit 0 and 255
    assert torch.allclose(x.max(), torch.tensor((1 - MEAN) / STD), atol=1e-5)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.shape == (4,)


def test_splits_disjoint_and_seeded(fake_fashion_dir):
    def split_labels(seed):
        dm = FashionMNISTDataModule(data_dir=str(fake_fashion_dir), val_size=5, seed=seed)
        dm.setup()
        return dm.train_set.tensors[0], dm.val_set.tensors[0]

    train, val = split_labels(0)
    all_rows = torch.cat([train, val]).flatten(1)
    assert len(torch.unique(all_rows, dim=0)) == 20  # each training image in exactly one split
    assert torch.equal(split_labels(0)[1], val)
    assert not torch.equal(split_labels(1)[1], val)


def test_train_shuffle_is_seeded(fake_fashion_dir):
    def first_epoch_labels(seed):
        dm = FashionMNISTDataModule(data_dir=str(fake_fashion_dir), batch_size=15, val_size=5, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))[0]

    a = first_epoch_labels(3)
    assert torch.equal(a, first_epoch_labels(3))
    dm = FashionMNISTDataModule(data_dir=str(fake_fashion_dir), batch_size=15, val_size=5, seed=3)
    dm.setup()
    assert not torch.equal(a, dm.train_set.tensors[0])  # shuffled, not in storage order


def test_limit_train_and_setup_once(fake_fashion_dir):
    dm = FashionMNISTDataModule(data_dir=str(fake_fashion_dir), val_size=5, limit_train=7)
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set and len(train_set) == 7 and len(dm.val_set) == 5


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    dm = FashionMNISTDataModule(data_dir=str(missing))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(missing) in message and "directory does not exist" in message
    assert all(name in message for name in FILES.values())
    assert "sudo apt-get install dataset-fashion-mnist" in message and "data_dir" in message


def test_missing_file(fake_fashion_dir):
    (fake_fashion_dir / FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(data_dir=str(fake_fashion_dir), val_size=5).setup()


def test_mismatched_files(fake_fashion_dir, write_idx_gz):
    write_idx_gz(fake_fashion_dir / FILES["train_labels"], np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected images \(N, H, W\) and labels \(N,\), got \(20, 28, 28\)"):
        FashionMNISTDataModule(data_dir=str(fake_fashion_dir), val_size=5).setup()


def test_val_size_too_large(fake_fashion_dir):
    with pytest.raises(ValueError, match="val_size must be smaller than the 20 training images, got 20"):
        FashionMNISTDataModule(data_dir=str(fake_fashion_dir), val_size=20).setup()


def test_loader_before_setup():
    with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
        FashionMNISTDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"val_size": -1}, "val_size must be a positive integer, got -1"),
        ({"limit_train": 0}, "limit_train must be a positive integer, got 0"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(**kwargs)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"{REAL_DIR} absent (sudo apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    dm = FashionMNISTDataModule(batch_size=32, limit_train=100)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 5000, 10000)
    x, y = dm.test_set.tensors
    assert x.shape == (10000, 1, 28, 28) == (10000, *dm.input_shape) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(dm.num_classes))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # normalised
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (32, 1, 28, 28) and yb.shape == (32,)
