"""KernelBenchmark's table: times in milliseconds, the speed-up vs dense (> 1 faster) with the verdict beside it."""

from lightning_sparse.callbacks.benchmark_table import SPEEDUP_NOTE, table_rows


def _row(name, dense, sparse, **extra):
    times = {"dense F.linear": dense, "SparseLinear": sparse, **extra}
    speedups = {key: dense / value for key, value in times.items() if key != "dense F.linear"}
    return {"name": name, "type": "Linear", "matrix_shape": [128, 256], "tokens": 64, "stored_density": 0.1,
            "reason": None, "times_ms": times, "speedups": speedups, "speedup": speedups["SparseLinear"],
            "faster": speedups["SparseLinear"] > 1, "errors": {}}


def test_columns_and_rows():
    conv = {"name": "conv", "type": "Conv2d", "matrix_shape": [64, 288], "input_shape": [8, 32, 7, 7],
            "stored_density": 0.33, "reason": None, "times_ms": {"dense Conv2d": 0.5, "SparseConv2d": 1.0},
            "speedups": {"SparseConv2d": 0.5}, "speedup": 0.5, "faster": False}
    skipped = {"name": "head", "type": "Linear", "matrix_shape": [10, 128], "stored_density": None,
               "reason": "shape (10, 128) is not divisible by the block 32x32"}
    broken = {**_row("bad", 1.0, 1.0), "faster": None, "speedup": None, "errors": {"SparseLinear": "max error 1"}}
    header, rows = table_rows({"layers": [_row("fc", 3.2, 2.0, bsr_linear=1.6), conv, skipped, broken]})
    assert header == ["layer", "type", "(out, in)", "input", "stored density", "dense (ms)", "sparse (ms)",
                      "speed-up vs dense", "verdict", "bsr_linear: speed-up vs dense"]
    table = [dict(zip(header, row, strict=True)) for row in rows]
    assert [t["speed-up vs dense"] for t in table] == ["1.60x", "0.50x", "-", "-"]
    assert [t["verdict"] for t in table] == ["faster", "slower", skipped["reason"], "failed: SparseLinear: max error 1"]
    assert (table[0]["dense (ms)"], table[0]["sparse (ms)"], table[0]["bsr_linear: speed-up vs dense"]) == (
        "3.2", "2", "2.00x")
    assert (table[1]["input"], table[1]["dense (ms)"], table[1]["bsr_linear: speed-up vs dense"]) == (
        "8x32x7x7", "0.5", "-")
    assert "> 1 is faster" in SPEEDUP_NOTE
