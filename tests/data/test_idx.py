import gzip

import numpy as np
import pytest

from lightning_sparse.data.idx import parse_idx, read_idx


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4"])
def test_round_trip(tmp_path, write_idx_gz, dtype):
    array = np.arange(-12, 12).reshape(2, 3, 4).astype(dtype) if dtype != "u1" else np.arange(24, dtype="u1")
    out = read_idx(write_idx_gz(tmp_path / "a.gz", array))
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative and out.flags.writeable


def test_uncompressed_file(tmp_path, idx_bytes):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.array([3, 1, 4], dtype=np.uint8)))
    assert read_idx(path).tolist() == [3, 1, 4]


def test_too_short():
    with pytest.raises(ValueError, match="not an IDX file, got only 3 bytes"):
        parse_idx(b"\x00\x00\x08")


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01"])
def test_bad_magic(tmp_path, magic):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(magic + b"\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match=f"bad IDX magic number 0x{magic.hex()}"):
        read_idx(path)


def test_truncated_header():
    with pytest.raises(ValueError, match="truncated IDX header, expected 12 bytes, got 8"):
        parse_idx(b"\x00\x00\x08\x02\x00\x00\x00\x02")


@pytest.mark.parametrize("extra", [b"", b"\x00\x00"])
def test_wrong_length(idx_bytes, extra):
    raw = idx_bytes(np.zeros((2, 2), dtype=np.uint8))
    raw = raw[:-1] if not extra else raw + extra
    with pytest.raises(ValueError, match=r"expected 16 bytes for shape \(2, 2\)"):
        parse_idx(raw)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="corrupt gzip file"):
        read_idx(path)


def test_truncated_gzip(tmp_path, write_idx_gz):
    path = write_idx_gz(tmp_path / "x.gz", np.zeros(1000, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt gzip file"):
        read_idx(path)
