"""Captured layer inputs reproduce each layer's output when multiplied by its weight."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.layer_inputs import capture_inputs, collect_hessians, forward_order, input_kinds
from lightning_sparse.models.transformer import TransformerBlock


def _capture(model, names, *args, **kwargs):
    seen = {}
    with torch.no_grad(), capture_inputs(model, names, lambda name, x: seen.setdefault(name, x)):
        output = model(*args, **kwargs)
    return seen, output


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, padding=2, dilation=2, stride=2),
        nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"),
        nn.Conv2d(3, 4, (2, 3), padding=(1, 0), stride=(2, 1)),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False),
    ],
)
def test_conv_patches_times_weight_is_the_conv(conv):
    x = torch.randn(2, 3, 9) if isinstance(conv, nn.Conv1d) else torch.randn(2, 3, 7, 8)
    seen, y = _capture(conv, ["weight"], x)
    expected = y.flatten(2).transpose(1, 2).reshape(-1, 4)
    bias = 0 if conv.bias is None else conv.bias
    torch.testing.assert_close(seen["weight"] @ conv.weight.flatten(1).T + bias, expected)


def test_linear_input_and_no_hooks_left_behind():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(2, 4, 3)
    seen, _ = _capture(model, ["0.weight", "2.weight"], x)
    torch.testing.assert_close(seen["0.weight"], x.reshape(-1, 3))
    torch.testing.assert_close(seen["2.weight"], model[1](model[0](x)).reshape(-1, 5))
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_self_attention_projections_and_out_proj_input():
    torch.manual_seed(0)
    block = TransformerBlock(dim=8, heads=2).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    before = block.attn.out_proj.weight.detach().clone()
    names = ["attn.in_proj_weight", "attn.out_proj.weight"]
    seen = {}
    with torch.no_grad(), capture_inputs(block, names, lambda name, inp: seen.setdefault(name, inp)):
        attn_out = block.attn(block.norm1(x), block.norm1(x), block.norm1(x), attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(seen["attn.in_proj_weight"], block.norm1(x).reshape(-1, 8))
    out = block.attn.out_proj
    torch.testing.assert_close(F.linear(seen["attn.out_proj.weight"], out.weight, out.bias), attn_out.reshape(-1, 8))
    assert torch.equal(out.weight, before)


def test_separate_projection_weights_take_their_own_input():
    mha = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    seen, _ = _capture(mha, ["q_proj_weight", "k_proj_weight", "v_proj_weight"], q, k, v)
    for name, tensor in zip(["q_proj_weight", "k_proj_weight", "v_proj_weight"], [q, k, v], strict=True):
        torch.testing.assert_close(seen[name], tensor.reshape(-1, tensor.shape[-1]))


def test_cross_attention_in_proj_raises():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match="in_proj_weight is shared by query, key and value, which differ"):
        _capture(mha, ["in_proj_weight"], torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))


@pytest.mark.parametrize("name", ["0.bias", "1.weight", "2.weight"])
def test_unsupported_parameters_are_named(name):
    model = nn.Sequential(nn.Linear(3, 4), nn.Embedding(5, 4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=rf"cannot capture the inputs of {name} \("):
        input_kinds(model, [name])


def test_hessians_and_forward_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3), torch.randn(7, 3)]
    hessians = collect_hessians(model, ["2.weight", "0.weight"], batches, lambda m, b: m(b))
    x = torch.cat(batches).double()
    torch.testing.assert_close(hessians["0.weight"], 2 * x.T @ x / 12)
    assert forward_order(model, ["2.weight", "0.weight"], batches[0], lambda m, b: m(b)) == ["0.weight", "2.weight"]

