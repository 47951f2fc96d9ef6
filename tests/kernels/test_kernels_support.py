import subprocess
import sys

import pytest

from lightning_sparse.kernels._support import has_triton, interpreting, next_pow2


@pytest.mark.parametrize(("n", "expected"), [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (100, 128)])
def test_next_pow2(n, expected):
    assert next_pow2(n) == expected


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_interpreting_reads_env_at_call_time(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is expected


def test_has_triton_is_bool():
    assert isinstance(has_triton(), bool)


def test_package_imports_without_triton():
    """With triton blocked, the packages import without loading the kernel modules (they are defined on the first
    launch, after tests set TRITON_INTERPRET), report no triton and raise a clear error when a kernel is called."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import lightning_sparse.formats, lightning_sparse.nn\n"
        "from lightning_sparse.kernels import bsr_linear, has_triton\n"
        "loaded = [m for m in sys.modules if m.startswith('lightning_sparse.kernels._') and m.endswith('_triton')]\n"
        "assert not loaded, loaded\n"
        "assert not has_triton()\n"
        "try:\n"
        "    bsr_linear(torch.zeros(1, 16), lightning_sparse.formats.dense_to_bsr(torch.ones(16, 16), 16))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
