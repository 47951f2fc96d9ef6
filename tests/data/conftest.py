import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from lightning_sparse.data.fashion_mnist import FILES

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encodes ``array`` (uint8/int8/int16/int32) as an uncompressed IDX file."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(f">HBB{array.ndim}I", 0, IDX_CODES[dtype], array.ndim, *array.shape)
    return header + array.astype(dtype).tobytes()


def _write_idx_gz(path: Path, array: np.ndarray) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(_idx_bytes(array))
    return path


@pytest.fixture
def idx_bytes():
    return _idx_bytes


@pytest.fixture
def write_idx_gz():
    return _write_idx_gz


@pytest.fixture
def fake_fashion_dir(tmp_path: Path) -> Path:
    """A directory with the four Fashion-MNIST files holding 20 train and 6 test images of 28x28."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 6)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx_gz(tmp_path / FILES[f"{split}_images"], images)
        _write_idx_gz(tmp_path / FILES[f"{split}_labels"], labels)
    return tmp_path
