import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.nn import SparseConv2d
from lightning_sparse.nn.sparse_conv import conv_unfit_reason, slow_conv_reason, used_input_channels


def keep_channels_(conv, channels):
    mask = torch.zeros(conv.in_channels, dtype=torch.bool)
    mask[list(channels)] = True
    conv.weight.data *= mask[None, :, None, None]
    return conv


def dense_reference(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)


# (in, out, kernel, stride, padding, dilation, bias, height, width, blocksize)
CONFIGS = [
    (5, 7, 3, 1, 1, 1, True, 9, 11, 1),
    (6, 4, (3, 5), 2, (2, 1), 1, False, 13, 10, (2, 15)),
    (3, 8, 2, 3, 0, 2, True, 17, 8, (8, 3)),
    (8, 6, 3, 1, "same", 2, True, 7, 12, (6, 9)),
    (4, 5, (1, 3), (2, 1), "valid", 1, True, 6, 9, 1),
    (9, 3, 1, 1, 0, 1, True, 5, 5, (3, 3)),
]


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "dilation", "bias", "h", "w", "block"), CONFIGS)
def test_forward_equals_conv2d_with_the_dense_weight(cin, cout, kernel, stride, padding, dilation, bias, h, w, block):
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias)
    keep_channels_(conv, range(0, cin, 2))  # every other input channel
    conv.weight.data[0] = 0.0  # and a whole output row
    sparse = SparseConv2d.from_dense(conv, blocksize=block)
    x = torch.randn(3, cin, h, w)
    expected = dense_reference(conv, x)
    torch.testing.assert_close(sparse(x), expected)
    torch.testing.assert_close(sparse(x[0]), expected[0])  # unbatched (C, H, W) input
    assert torch.equal(sparse.to_dense(), conv.weight.detach())
    assert sparse.used_channels.tolist() == list(range(0, cin, 2))


def test_unstructured_weight_uses_every_channel_and_equals_dense():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    conv.weight.data *= torch.rand_like(conv.weight) < 0.5
    sparse = SparseConv2d.from_dense(conv)
    assert sparse.used_channel_fraction == 1.0
    assert sparse.density == pytest.approx((conv.weight != 0).float().mean().item())  # CSR stores the non-zeros
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(sparse(x), dense_reference(conv, x))


@pytest.mark.parametrize("bias", [True, False])
def test_empty_weight_outputs_the_bias(bias):
    conv = nn.Conv2d(4, 3, 3, stride=2, bias=bias)
    conv.weight.data.zero_()
    sparse = SparseConv2d.from_dense(conv, blocksize=(3, 4))
    x = torch.randn(2, 4, 9, 7)
    assert sparse.values.shape == (0, 3, 4) and sparse.density == 0.0 and sparse.used_channel_fraction == 0.0
    torch.testing.assert_close(sparse(x), dense_reference(conv, x))


def test_channels_last_input_gives_channels_last_output():
    conv = keep_channels_(nn.Conv2d(8, 16, 3, padding=1), [1, 5])
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = SparseConv2d.from_dense(conv)(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, dense_reference(conv, x))


def test_state_dict_round_trip_with_another_block_count():
    conv = keep_channels_(nn.Conv2d(8, 4, 3), [2, 3])
    sparse = SparseConv2d.from_dense(conv, blocksize=(4, 9))
    assert set(sparse.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}  # packed weight derived
    empty = SparseConv2d.empty_like(nn.Conv2d(8, 4, 3), blocksize=(4, 9))
    assert empty.values.shape[0] == 0
    empty.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(empty(x), dense_reference(conv, x))
    assert empty.used_channels.tolist() == [2, 3]
    assert pickle.loads(pickle.dumps(empty)).used_channels.tolist() == [2, 3]


def test_to_casts_the_packed_weight():
    conv = keep_channels_(nn.Conv2d(4, 4, 3), [0])
    sparse = SparseConv2d.from_dense(conv).to(torch.float64)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert sparse(x).dtype == torch.float64
    torch.testing.assert_close(sparse(x), dense_reference(conv.double(), x))


def test_helpers_and_rule():
    conv = keep_channels_(nn.Conv2d(8, 4, 3), [1, 6])
    assert used_input_channels(conv.weight).tolist() == [1, 6]
    assert conv_unfit_reason(conv, "bsr", (4, 9)) is None and slow_conv_reason(conv.weight) is None
    assert conv_unfit_reason(conv, "bsr", (4, 16)) == "matrix view (4, 72) is not divisible by the block 4x16"
    assert conv_unfit_reason(conv, "2:4", None) == "2:4 is not a Conv2d format (SparseConv2d stores BSR blocks)"
    assert conv_unfit_reason(nn.Conv2d(4, 4, 3, groups=2), "bsr", (1, 1)).startswith("groups=2 is not supported")
    assert conv_unfit_reason(nn.Conv2d(4, 4, 3, padding_mode="reflect"), "bsr", (1, 1)).startswith(
        "padding_mode='reflect' is not supported"
    )
    reason = slow_conv_reason(keep_channels_(nn.Conv2d(8, 4, 3), range(5)).weight)
    assert reason.startswith("reads 5 of 8 input channels: SparseConv2d skips unused input channels")


def test_argument_errors():
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        SparseConv2d.from_dense(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="SparseConv2d supports groups=1 only, got groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(
        ValueError, match="SparseConv2d supports padding_mode='zeros' only, got padding_mode='circular'"
    ):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match=r"blocksize \(4, 8\) must divide the weight's matrix view \(4, 36\)"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), blocksize=(4, 8))
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        SparseConv2d(4, 4, 3, blocksize=0)

