"""SparseLinear's ``backend="triton"`` tests run the Triton kernels in the CPU interpreter (see tests/kernels)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
