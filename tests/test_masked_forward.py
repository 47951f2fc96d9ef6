"""MaskedForward: the forward uses fn(param) on Linear, Conv1d/2d and MultiheadAttention; parameters stay plain."""

import copy
import pickle
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_sparse.masked_forward import MaskedForward


def _masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(3)
    return {n: (torch.rand(params[n].shape, generator=generator) < 0.5).float() for n in names}


def _masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``model`` whose weights were multiplied by the masks."""
    plain = copy.deepcopy(model)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return plain


def _install(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskedForward:
    return MaskedForward(model, {name: partial(torch.mul, other=mask) for name, mask in masks.items()})


class Attention(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x if self.batch_first else x.transpose(0, 1)
        kv = q if self.attn._qkv_same_embed_dim else q[..., :4]
        return self.attn(q, kv, kv, need_weights=False)[0]


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), ["0.weight", "2.weight"], (4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv1d(4, 2, 2)), ["0.weight", "1.weight"], (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), ["weight"], (2, 3, 5, 5)),
    "mha-batch-first": (lambda: Attention(True), ["attn.in_proj_weight", "attn.out_proj.weight"], (2, 5, 8)),
    "mha-seq-first": (lambda: Attention(False), ["attn.in_proj_weight", "attn.out_proj.weight"], (2, 5, 8)),
    "mha-kdim": (lambda: Attention(True, kdim=4), ["attn.q_proj_weight", "attn.k_proj_weight", "attn.out_proj.weight"],
                 (2, 5, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_a_plain_masked_module(case):
    make, names, shape = CASES[case]
    model = make()
    masks = _masks(model, names)
    plain = _masked_copy(model, masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.named_parameters())
    handle = _install(model, masks)
    x = torch.randn(shape)
    out, expected = model(x), plain(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    plain_grads = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        want = plain_grads[name].grad * masks[name] if name in masks else plain_grads[name].grad
        torch.testing.assert_close(param.grad, want, msg=name)
    assert list(model.named_parameters()) == params_before  # same names, same Parameter objects
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # dense, untouched
    assert not any(n in m.__dict__ for m in model.modules() for n in m._parameters)  # removed after the call
    model.eval(), plain.eval()
    with torch.no_grad():  # the attention fast path reads the same attributes
        torch.testing.assert_close(model(x), plain(x))
    handle.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))


def test_gradient_accumulation_and_checkpointing_build_one_graph_per_forward():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    MaskedForward(model, {"0.weight": lambda w: w * torch.sigmoid(w.abs() * 4 - 1)})
    x = torch.randn(8, 6)
    model(x).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in x.chunk(2):  # two forwards and two backwards: each forward has its own mask graph
        model(half).square().sum().backward()
    for p, want in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, want)
    for reentrant in (False, True):
        model.zero_grad()
        checkpoint(model, x.requires_grad_(reentrant), use_reentrant=reentrant).square().sum().backward()
        for p, want in zip(model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.grad, want)


def test_deepcopy_pickle_exceptions_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    masks = _masks(model, ["0.weight"])
    _install(model, masks)
    x = torch.randn(3, 4)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    with torch.no_grad():
        clone[0].weight.zero_()
    assert not torch.allclose(clone(x), model(x))  # the copy's hooks read the copy's parameters
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x))
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 5))
    assert "weight" not in model[0].__dict__
    with pytest.raises(ValueError, match=r"\['head.weight'\] are not parameters of the model"):
        MaskedForward(model, {"head.weight": lambda w: w})

