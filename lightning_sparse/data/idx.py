"""A small reader for the IDX format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x0000TTNN`` (``TT`` the element type, ``NN`` the number of
dimensions), ``NN`` big-endian uint32 sizes, then the elements in C order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of an (uncompressed) IDX file.

    Args:
        raw: the whole file content.
        name: how error messages name the source.

    Returns:
        A writable array in native byte order with the shape stored in the header.

    Raises:
        ValueError: if the magic number, the header or the data length is wrong.

    Example::

        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    if len(raw) < 4:
        raise ValueError(f"{name}: not an IDX file, got only {len(raw)} bytes")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in IDX_DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{name}: bad IDX magic number 0x{raw[:4].hex()}, expected 0x0000TTNN with TT in {codes}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header, expected {header} bytes, got {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{name}: expected {expected} bytes for shape {shape}, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip-compressed when its name ends with ``.gz``.

    Args:
        path: the file to read.

    Raises:
        ValueError: if the file is not valid gzip or not a valid IDX file.

    Example::

        from lightning_sparse.data.idx import read_idx

        images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # (10000, 28, 28) uint8
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip file ({err})") from err
    return parse_idx(raw, name=str(path))
