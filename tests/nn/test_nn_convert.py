import pytest
import torch
from torch import nn

from lightning_sparse.nn import SparseConv2d, SparseLinear, inference_plan, to_sparse_inference


def prune_blocks_(linear, block=16, density=0.5):
    n, k = linear.weight.shape
    keep = torch.rand(n // block, k // block) < density
    keep[:, 0] = True
    linear.weight.data *= keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def prune_24_(linear):
    linear.weight.data.view(linear.out_features, -1, 4)[..., 1::2] = 0.0


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize(("pattern", "prune_"), [("16x16", prune_blocks_), ("2:4", prune_24_)])
def test_mlp_outputs_match_dense(pattern, prune_):
    model = mlp()
    for i in (0, 2):
        prune_(model[i])
    x = torch.randn(7, 32)
    expected = model(x)
    assert to_sparse_inference(model, pattern=pattern) is model
    assert [type(model[i]) for i in (0, 2, 4)] == [SparseLinear, SparseLinear, nn.Linear]  # 10 outputs: no fit
    torch.testing.assert_close(model(x), expected)


def test_non_square_blocks_and_min_sparsity():
    model = mlp()
    prune_blocks_(model[0], density=0.3)  # model[2] stays dense: sparsity 0 < min_sparsity
    to_sparse_inference(model, pattern="16x32", min_sparsity=0.2)
    assert isinstance(model[0], SparseLinear) and model[0].blocksize == (16, 32)
    assert type(model[2]) is nn.Linear


def test_include_globs():
    model = nn.Sequential(mlp(), mlp())
    to_sparse_inference(model, pattern="16x16", include=["1.*"])
    assert type(model[0][0]) is nn.Linear and isinstance(model[1][0], SparseLinear)
    to_sparse_inference(model, pattern="16x16", include="0.2.weight")
    assert isinstance(model[0][2], SparseLinear) and type(model[0][0]) is nn.Linear


def test_include_glob_without_a_fitting_layer_raises():
    model = mlp()
    prune_24_(model[0])
    with pytest.raises(ValueError, match=r"include glob '4' matched no layer that fits pattern '16x16': '4': shape"):
        to_sparse_inference(model, pattern="16x16", include=["0", "4"])
    assert type(model[0]) is nn.Linear  # checked before any swap
    with pytest.raises(ValueError, match="glob '2' .* pattern '2:4': '2': the weight is not 2:4 sparse"):
        to_sparse_inference(model, pattern="2:4", include=["0", "2"])
    to_sparse_inference(model, pattern="2:4", include="[02]")  # one glob: fits through layer 0, skips layer 2
    assert isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match=r"glob '\*' .* '0': in_features 6 is not divisible by 4"):
        to_sparse_inference(nn.Sequential(nn.Linear(6, 4)), pattern="2:4", include="*")
    with pytest.raises(ValueError, match="glob 'encoder.*' matched no layer .*: no nn.Linear, Hugging Face Conv1D or"):
        to_sparse_inference(model, include=["encoder.*"])


def test_unfit_layers_left_dense_without_include():
    model = mlp()
    to_sparse_inference(model, pattern="2:4")  # dense weights are not 2:4
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 2, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_skipped():
    model = Attention().eval()
    prune_blocks_(model.mha.out_proj)
    prune_blocks_(model.fc)
    x = torch.randn(2, 5, 32)
    expected = model(x)
    to_sparse_inference(model, pattern="16x16")
    assert isinstance(model.fc, SparseLinear)
    assert isinstance(model.mha.out_proj, nn.Linear)
    torch.testing.assert_close(model(x), expected)


def test_root_linear_returns_the_new_module():
    linear = nn.Linear(32, 32)
    prune_blocks_(linear)
    assert isinstance(to_sparse_inference(linear, pattern="16x16"), SparseLinear)


@pytest.mark.parametrize("pattern", ["32", "2:8", "dense", "0x16"])
def test_bad_pattern(pattern):
    with pytest.raises(ValueError, match=f'pattern must be "RxC" blocks .* or "2:4", got \'{pattern}\''):
        to_sparse_inference(mlp(), pattern=pattern)


@pytest.mark.parametrize("min_sparsity", [-0.1, 1.5])
def test_bad_min_sparsity(min_sparsity):
    with pytest.raises(ValueError, match=f"min_sparsity must be in \\[0, 1\\], got {min_sparsity}"):
        to_sparse_inference(mlp(), min_sparsity=min_sparsity)


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.Flatten(), nn.Linear(144, 16)
    )


def keep_channels_(conv, channels):
    mask = torch.zeros(conv.in_channels, dtype=torch.bool)
    mask[list(channels)] = True
    conv.weight.data *= mask[None, :, None, None]


def test_cnn_converts_convs_that_read_few_channels():
    model = cnn().eval()
    keep_channels_(model[2], [1, 4, 6])  # 3 of 8 input channels
    prune_blocks_(model[4])
    x = torch.randn(2, 3, 7, 7)
    expected = model(x)
    to_sparse_inference(model, pattern="8x9")  # model[0] fits too, but reads every channel: stays dense
    assert [type(model[i]) for i in (0, 2, 4)] == [nn.Conv2d, SparseConv2d, SparseLinear]
    assert model[2].used_channels.tolist() == [1, 4, 6] and model[2].blocksize == (8, 9)
    torch.testing.assert_close(model(x), expected)


def test_conv_reading_most_channels_stays_dense_unless_included():
    model = cnn().eval()
    model[2].weight.data *= torch.rand_like(model[2].weight) < 0.1  # unstructured: reads (nearly) every channel
    assert type(to_sparse_inference(model, pattern="1x1")[2]) is nn.Conv2d  # not faster: the rule keeps it dense
    x = torch.randn(2, 3, 7, 7)
    expected = model(x)
    to_sparse_inference(model, pattern="1x1", include="2")
    assert isinstance(model[2], SparseConv2d)
    torch.testing.assert_close(model(x), expected)


def test_unsupported_convs_stay_dense_or_raise_when_included():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    for conv in model:
        conv.weight.data.zero_()
    to_sparse_inference(model, pattern="1x1")
    assert all(type(conv) is nn.Conv2d for conv in model)
    with pytest.raises(ValueError, match=r"glob '0' matched no layer .*: '0': groups=2 is not supported"):
        to_sparse_inference(model, pattern="1x1", include="0")
    with pytest.raises(ValueError, match=r"glob '1' .*: '1': padding_mode='reflect' is not supported"):
        to_sparse_inference(model, pattern="1x1", include="1")
    with pytest.raises(ValueError, match=r"glob '0' .* pattern '2:4': '0': 2:4 is not a Conv2d format"):
        to_sparse_inference(model, pattern="2:4", include="0")


def test_tied_weights_stay_dense_with_a_reason():
    model = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 32), nn.Linear(32, 16, bias=False))
    model[2].weight = model[0].weight  # a language model's head tied to its embedding
    for i in (1, 2):
        prune_blocks_(model[i])
    assert inference_plan(model, pattern="16x16") == {
        "1": None,
        "2": "its weight is tied to '0.weight': tied weights stay dense (converting would untie them)",
    }
    with pytest.raises(ValueError, match=r"glob '2' matched no layer .*: '2': its weight is tied to '0.weight'"):
        to_sparse_inference(model, pattern="16x16", include="2")
    to_sparse_inference(model, pattern="16x16")
    assert isinstance(model[1], SparseLinear) and model[2].weight is model[0].weight


def test_inference_plan_gives_every_reason():
    model = nn.Sequential(Attention(), mlp())
    prune_blocks_(model[1][0], density=0.3)
    plan = inference_plan(model, pattern="16x16", min_sparsity=0.2)
    assert plan["0.mha.out_proj"] == "nn.MultiheadAttention.out_proj stays dense (MHA reads its weight directly)"
    assert plan["1.0"] is None and plan["1.4"] == "shape (10, 32) is not divisible by the block 16x16"
    assert plan["1.2"] == "0.000 of its weights are zero, below min_sparsity=0.2"
    assert inference_plan(model, pattern="16x16", include="1.0")["1.2"] == "not matched by include"
    with pytest.raises(ValueError, match=r"glob '0.mha.out_proj' .*: '0.mha.out_proj': nn.MultiheadAttention.out_pr"):
        inference_plan(model, pattern="16x16", include="0.mha.out_proj")
