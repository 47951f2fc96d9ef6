"""Hugging Face ``Conv1D`` (GPT-2; weight stored ``(in, out)``) becomes a ``SparseLinear`` of its ``(out, in)`` view;
GPT-2's ``lm_head``, tied to ``wte``, stays dense."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_sparse.nn import SparseLinear, inference_plan, to_sparse_inference  # noqa: E402
from tests.hf_models import HF_GPT2, text_batches  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D


def prune_inputs_24_(conv1d):
    """2:4 along the inputs: dim 0 of the stored ``(in, out)`` weight."""
    conv1d.weight.data.view(-1, 4, conv1d.nf)[:, 1::2] = 0.0


@pytest.mark.parametrize(("fmt", "blocksize"), [("2:4", 1), ("bsr", (8, 4))])
def test_conv1d_becomes_the_same_function(fmt, blocksize):
    torch.manual_seed(0)
    conv = Conv1D(16, 32)  # nf=16 outputs, nx=32 inputs: stored (32, 16)
    prune_inputs_24_(conv)
    conv.bias.data.normal_()
    sparse = SparseLinear.from_dense(conv, format=fmt, blocksize=blocksize)
    assert (sparse.in_features, sparse.out_features) == (32, 16)
    torch.testing.assert_close(sparse.to_dense(), conv.weight.t())
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-6)


def test_conv1d_pruned_along_its_outputs_is_not_2_4():
    conv = Conv1D(16, 32)
    conv.weight.data.view(32, -1, 4)[..., 1::2] = 0.0  # groups along the stored last dim: the outputs
    assert inference_plan(torch.nn.Sequential(conv), pattern="2:4") == {"0": "the weight is not 2:4 sparse"}
    conv = Conv1D(16, 6)
    with pytest.raises(ValueError, match=r"'0': Conv1D weight stored as \(6, 16\), \(out, in\) view \(16, 6\): in_fe"):
        to_sparse_inference(torch.nn.Sequential(conv), pattern="2:4", include="0")


def test_gpt2_converts_conv1d_and_leaves_the_tied_head():
    model = HF_GPT2.make().eval()
    gpt2 = model.model
    convs = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in convs:
        prune_inputs_24_(model.get_submodule(name))
    ids = next(iter(text_batches(1)))["input_ids"]
    with torch.no_grad():
        expected = model(ids)
    plan = inference_plan(model, pattern="2:4")
    tied = "its weight is tied to 'model.transformer.wte.weight': tied weights stay dense (converting would untie them)"
    assert plan == {**dict.fromkeys(convs), "model.lm_head": tied}
    assert to_sparse_inference(model, pattern="2:4") is model
    assert all(isinstance(model.get_submodule(name), SparseLinear) for name in convs)
    assert type(gpt2.lm_head) is torch.nn.Linear and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
