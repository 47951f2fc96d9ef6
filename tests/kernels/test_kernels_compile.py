"""The kernels compile through Triton's real NVIDIA backend (TTIR -> PTX for sm_90); no GPU needed.

The interpreter runs kernels as numpy code, so it misses what only the compiler checks (tl.dot shapes and dtypes,
constexpr use, layout conversions of reshape/join/trans). This compiles each kernel ahead of time in a subprocess
with TRITON_INTERPRET=0.
"""

import os
import subprocess
import sys

import pytest

from lightning_sparse.kernels import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as err:
    print(f"SKIP no ahead-of-time compile API in this triton: {err}")
    sys.exit(0)
from lightning_sparse.kernels import _bsr_matmul_triton as bsr, _sparse24_matmul_triton as s24


def compile_kernel(fn, runtime, constexprs):
    names = fn.arg_names
    signature = {n: runtime.get(n, "i32") for n in names}
    signature.update({n: "constexpr" for n in constexprs})
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    except Exception as err:
        print(f"SKIP ASTSource API differs: {err}")
        sys.exit(0)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})


for dt, precision in (("fp16", "tf32"), ("fp32", "ieee")):
    ptrs = {n: f"*{dt}" for n in ("x_ptr", "values_ptr", "bias_ptr", "y_ptr")}
    common = {"HAS_BIAS": True, "DOT_FP32": False, "INPUT_PRECISION": precision, "BLOCK_M": 16}
    for r, c in ((32, 32), (16, 32)):
        compile_kernel(
            bsr.bsr_linear_kernel,
            {**ptrs, "crow_ptr": "*i64", "col_ptr": "*i64"},
            {**common, "R": r, "C": c, "BLOCK_R": 16, "BLOCK_C": c},
        )
    compile_kernel(
        s24.sparse24_linear_kernel, {**ptrs, "meta_ptr": "*i16"}, {**common, "BLOCK_N": 64, "BLOCK_K": 64}
    )
print("OK")
"""


def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert result.stdout.strip() == "OK"
