import torch
from torch import nn

from lightning_sparse.kernels.timing import (
    DENSE,
    DENSE_CONV,
    SPARSE,
    SPARSE_CONV,
    check_candidates,
    conv_candidates,
    linear_candidates,
    time_calls,
)


def test_cpu_candidates_agree_with_dense_and_time_positive():
    layer = nn.Linear(64, 32)
    layer.weight.data[:, 32:] = 0.0
    fns = linear_candidates(layer, torch.randn(8, 64), "bsr", (32, 32))
    good, bad = check_candidates(fns)
    assert set(good) == {DENSE, SPARSE} and bad == {}
    times = time_calls(good, "cpu", warmup=0.5, rep=2.0)
    assert set(times) == {DENSE, SPARSE} and all(t > 0 for t in times.values())


def test_wrong_or_failing_candidates_are_reported():
    x = torch.ones(3)

    def broken():
        raise RuntimeError("no kernel\nsecond line")

    good, bad = check_candidates({DENSE: lambda: x, "off": lambda: x + 1, "broken": broken})
    assert list(good) == [DENSE]
    assert bad == {"off": "wrong result: max abs error 1", "broken": "RuntimeError: no kernel"}


def test_no_functions_no_times():
    assert time_calls({}, "cpu") == {}


def test_conv_candidates_agree_with_dense():
    conv = nn.Conv2d(8, 4, 3, padding=1)
    conv.weight.data[:, 2:] = 0.0
    good, bad = check_candidates(conv_candidates(conv, torch.randn(2, 8, 5, 5), (4, 9)), reference=DENSE_CONV)
    assert set(good) == {DENSE_CONV, SPARSE_CONV} and bad == {}
