"""A byte-level language-modelling corpus: the Python standard library's own source (always on the machine)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_sparse._checks import check_positive_int
from lightning_sparse.data._checks import check_fractions


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens starting every ``stride`` tokens, split into (x, y = x shifted by one).

    Args:
        tokens: 1-D tensor of token ids (any integer dtype; items are int64).
        block_size: length of x and y.
        stride: distance between consecutive window starts.

    Example::

        >>> x, y = TokenWindows(torch.arange(10), block_size=4, stride=4)[1]
        >>> x.tolist(), y.tolist()
        ([4, 5, 6, 7], [5, 6, 7, 8])
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int) -> None:
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        chunk = self.tokens[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def stdlib_source(max_chars: int) -> bytes:
    """The ``*.py`` files directly in the stdlib folder, sorted by name, concatenated, cut at ``max_chars`` bytes.

    Raises:
        FileNotFoundError: if the stdlib folder holds no ``*.py`` file.

    Example::

        from lightning_sparse.data.python_source import stdlib_source

        text = stdlib_source(10_000).decode("utf-8", errors="replace")
    """
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the Python standard library folder {folder}")
    parts, total = [], 0
    for path in files:
        if total >= max_chars:
            break
        parts.append(path.read_bytes())
        total += len(parts[-1])
    return b"".join(parts)[:max_chars]


class PythonSourceDataModule(L.LightningDataModule):
    """Character-level (byte-level, ``vocab_size=256``) language modelling on the Python standard library.

    The corpus is split into contiguous train / val / test ranges, in that order. Each item is ``(x, y)``
    with ``x`` of ``block_size`` tokens and ``y`` the same window shifted by one token. An epoch of
    training draws ``len(train) // block_size`` windows at random offsets (a sampler seeded with
    ``seed``); validation and test use fixed non-overlapping windows.

    Args:
        block_size: context length of each sample.
        batch_size: batch size of every loader.
        max_chars: corpus length in bytes (before splitting).
        val_fraction: fraction of the corpus in the validation range, in (0, 1).
        test_fraction: fraction of the corpus in the test range, in (0, 1).
        seed: seeds the training offsets.

    Raises:
        ValueError: if ``block_size``, ``batch_size`` or ``max_chars`` is not a positive integer, the
            fractions are out of range, or (in ``setup``) a split is shorter than ``block_size + 1``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import PythonSourceDataModule
        from lightning_sparse.models import CharGPT

        dm = PythonSourceDataModule(block_size=128)
        Trainer(max_steps=2000).fit(CharGPT(block_size=128), datamodule=dm)
    """

    vocab_size = 256

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 64,
        max_chars: int = 2_000_000,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int(block_size=block_size, batch_size=batch_size, max_chars=max_chars)
        check_fractions(val_fraction, test_fraction)
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.splits: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Reads and splits the corpus once; later calls do nothing."""
        if self.splits:
            return
        tokens = torch.frombuffer(bytearray(stdlib_source(self.max_chars)), dtype=torch.uint8)
        n = len(tokens)
        n_val, n_test = int(self.val_fraction * n), int(self.test_fraction * n)
        n_train = n - n_val - n_test
        splits = {"train": tokens[:n_train], "val": tokens[n_train : n_train + n_val]}
        splits["test"] = tokens[n_train + n_val :]
        for name, split in splits.items():
            if len(split) <= self.block_size:
                raise ValueError(
                    f"the {name} split has {len(split)} tokens, needs more than block_size={self.block_size}; "
                    f"raise max_chars (got {self.max_chars}) or the split fractions"
                )
        self.splits = splits

    def _split(self, name: str) -> torch.Tensor:
        if not self.splits:
            raise RuntimeError("call setup() before requesting a dataloader")
        return self.splits[name]

    def _eval_loader(self, name: str) -> DataLoader:
        return DataLoader(TokenWindows(self._split(name), self.block_size, self.block_size), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        tokens = self._split("train")
        dataset = TokenWindows(tokens, self.block_size, stride=1)
        sampler = RandomSampler(
            dataset, num_samples=len(tokens) // self.block_size, generator=torch.Generator().manual_seed(self.seed)
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
