import sysconfig
from pathlib import Path

import pytest
import torch

from lightning_sparse.data.python_source import PythonSourceDataModule, TokenWindows, stdlib_source


def test_stdlib_source_sorted_and_truncated():
    text = stdlib_source(5000)
    assert len(text) == 5000
    assert stdlib_source(9000)[:5000] == text  # deterministic prefix
    first = min(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert text.startswith(first.read_bytes()[:100])


def test_stdlib_source_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="no \\*.py files in the Python standard library folder"):
        stdlib_source(100)


def test_token_windows():
    windows = TokenWindows(torch.arange(10, dtype=torch.uint8), block_size=4, stride=2)
    assert len(windows) == 3  # starts 0, 2, 4 (window of 5 tokens)
    x, y = windows[2]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and x.dtype == torch.int64
    assert len(TokenWindows(torch.arange(4), block_size=4, stride=1)) == 0


def test_splits_contiguous_and_shapes():
    dm = PythonSourceDataModule(block_size=16, batch_size=8, max_chars=20_000, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [16_000, 2_000, 2_000]
    corpus = torch.frombuffer(bytearray(stdlib_source(20_000)), dtype=torch.uint8)
    assert torch.equal(torch.cat([dm.splits["train"], dm.splits["val"], dm.splits["test"]]), corpus)
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 16_000 // 16
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64 and int(x.max()) < dm.vocab_size
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


def test_val_windows_follow_corpus():
    dm = PythonSourceDataModule(block_size=16, batch_size=4, max_chars=20_000, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    val = dm.splits["val"].long()
    assert torch.equal(x[1], val[16:32]) and torch.equal(y[1], val[17:33])
    assert len(dm.test_dataloader().dataset) == (2_000 - 17) // 16 + 1


def test_train_offsets_seeded():
    def first_batch(seed):
        dm = PythonSourceDataModule(block_size=8, batch_size=4, max_chars=5_000, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_split_too_small():
    dm = PythonSourceDataModule(block_size=128, max_chars=1000)
    with pytest.raises(ValueError, match="the val split has 50 tokens, needs more than block_size=128"):
        dm.setup()


def test_loader_before_setup():
    with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
        PythonSourceDataModule().test_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"batch_size": -2}, "batch_size must be a positive integer, got -2"),
        ({"max_chars": 0}, "max_chars must be a positive integer, got 0"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\)"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "leave a training split"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PythonSourceDataModule(**kwargs)
