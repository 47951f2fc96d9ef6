import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from lightning_sparse.data.digits import DigitsDataModule


def _rows(*datasets):
    """Sorted (pixels..., label) rows of the datasets: equal lists mean equal multisets of samples."""
    x = torch.cat([d.tensors[0].flatten(1) for d in datasets])
    y = torch.cat([d.tensors[1] for d in datasets]).unsqueeze(1).float()
    return sorted(map(tuple, torch.cat([x, y], dim=1).tolist()))


def test_shapes_and_range():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1079, 359, 359)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, *dm.input_shape) == (16, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < dm.num_classes
    all_x = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0], dm.test_set.tensors[0]])
    assert all_x.min() == 0 and all_x.max() == 1


def test_splits_disjoint_and_deterministic():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    digits = load_digits()
    full = TensorDataset(torch.tensor(digits.images).unsqueeze(1) / 16, torch.tensor(digits.target))
    assert _rows(a.train_set, a.val_set, a.test_set) == _rows(full)  # a partition: disjoint and complete
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])


def test_train_loader_seeded_shuffle():
    a, b = DigitsDataModule(batch_size=1079, seed=5), DigitsDataModule(batch_size=1079, seed=5)
    a.setup()
    b.setup()
    xa, xb = next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, a.train_set.tensors[0])


def test_missing_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        DigitsDataModule().setup()


def test_loader_before_setup():
    with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
        DigitsDataModule().val_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\), got 1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
