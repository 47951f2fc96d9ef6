"""``sparsegpt_`` on a tiny CharGPT, and every error path of ``sparsegpt_`` and ``SparseGPT``."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_sparse.callbacks.sparsegpt import SparseGPT, sparsegpt_
from lightning_sparse.models import CharGPT

TARGETS = [
    f"blocks.{i}.{p}"
    for i in range(2)
    for p in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight")
] + ["head.weight"]


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = CharGPT(vocab_size=32, block_size=16, dim=16, depth=2, heads=2)
    batches = [(torch.randint(0, 32, (4, 16)), None) for _ in range(3)]
    return model, batches


@pytest.mark.parametrize(
    "options",
    [{"sequential": True}, {"sequential": False}, {"nm_selection": "independent"}, {"refit": True, "reselect": 1}],
)
def test_prunes_every_projection_and_writes_weights_back(gpt, options):
    dense, batches = gpt
    model = copy.deepcopy(dense)
    masks = sparsegpt_(model, batches, nm="2:4", progress=False, **options)
    assert list(masks) == TARGETS
    params, before = dict(model.named_parameters()), dict(dense.named_parameters())
    for name, mask in masks.items():
        assert (mask.reshape(-1, 4).sum(1) == 2).all(), name
        assert (params[name][~mask] == 0).all(), name
        assert (params[name][mask] != before[name][mask]).float().mean() > 0.5, f"{name} kept weights not updated"


def test_sequential_sees_the_pruned_layers_before(gpt):
    dense, batches = gpt
    sequential, one_pass = copy.deepcopy(dense), copy.deepcopy(dense)
    sparsegpt_(sequential, batches, density=0.5, progress=False)
    sparsegpt_(one_pass, batches, density=0.5, sequential=False, progress=False)
    first, last = "blocks.0.attn.in_proj_weight", "head.weight"
    assert torch.equal(sequential.get_parameter(first), one_pass.get_parameter(first))
    assert not torch.equal(sequential.get_parameter(last), one_pass.get_parameter(last))
    assert int((sequential.get_parameter(last) != 0).sum()) == sequential.get_parameter(last).numel() // 2


def test_custom_forward_include_and_no_output(gpt, capsys):
    dense, _ = gpt
    model = copy.deepcopy(dense)
    batches = [{"ids": torch.randint(0, 32, (2, 16))}]
    masks = sparsegpt_(
        model, batches, density=0.25, include=["*.mlp.*.weight"], forward=lambda m, b: m(b["ids"]), progress=False
    )
    assert list(masks) == [
        "blocks.0.mlp.0.weight",
        "blocks.0.mlp.2.weight",
        "blocks.1.mlp.0.weight",
        "blocks.1.mlp.2.weight",
    ]
    assert capsys.readouterr().out == ""


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batches": []}, ValueError, "at least one calibration batch"),
        ({"density": 0.5, "nm": "2:4"}, ValueError, "exactly one of density"),
        ({"density": None}, ValueError, "exactly one of density"),
        ({"density": None, "nm": "4:4"}, ValueError, "0 < N < M"),
        ({"density": None, "nm": "2:3"}, ValueError, r"m=3, but used.weight: a Linear weight stored as \(8, 8\)"),
        ({"include": ["used.bias"]}, ValueError, r"cannot capture the inputs of used.bias \(Linear\)"),
        ({"include": ["unused.weight"]}, ValueError, "no calibration batch reached unused.weight"),
        ({"forward": "model"}, TypeError, "forward must be a callable"),
        ({"block_size": 0}, ValueError, "block_size must be >= 1"),
        ({"damp": -0.1}, ValueError, "damp must be a number >= 0"),
        ({"density": None, "nm": "2:4", "nm_selection": "exact"}, ValueError, "nm_selection must be 'joint' or"),
        ({"reselect": 1, "refit": True}, ValueError, "reselect=1 re-selects N:M masks and needs nm="),
        ({"refit": 1}, TypeError, "refit must be a bool, got int: 1"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"batches": [torch.randn(4, 8)], "density": 0.5, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        sparsegpt_(_TwoBranch(), args.pop("batches"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of density"),
        ({"density": 0.5, "at": "epoch_end"}, "at must be 'fit_start', 'fit_end' or an optimizer step >= 0, got 'epoc"),
        ({"density": 0.5, "at": -1}, "at must be 'fit_start', 'fit_end' or an optimizer step >= 0, got -1"),
        ({"density": 0.5, "calibration_batches": 0}, "calibration_batches must be >= 1"),
        ({"density": 0.5, "damp": -1}, "damp must be a number >= 0"),
        ({"nm": "2:8:4"}, "pattern must be"),
        ({"nm": "2:4", "reselect": 1}, "reselect=1 re-selects masks for least-squares weights and needs refit=True"),
        ({"nm": "2:4", "nm_selection": "saliency"}, "nm_selection must be 'joint' or 'independent', got 'saliency'"),
    ],
)
def test_callback_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseGPT(**kwargs)


def test_callback_setup_errors():
    trainer = SimpleNamespace(callbacks=[])
    with pytest.raises(ValueError, match=r"cannot capture the inputs of tok_embed.weight \(Embedding\)"):
        SparseGPT(density=0.5, include=["tok_embed.weight"]).setup(trainer, CharGPT(dim=16, heads=2), "fit")
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"m=4, but 0.weight: a Linear weight stored as \(4, 6\)"):
        SparseGPT(nm="2:4").setup(trainer, model, "fit")


def test_callback_empty_train_dataloader():
    trainer = SimpleNamespace(train_dataloader=[])
    with pytest.raises(ValueError, match="no calibration batch: the train dataloader is empty"):
        SparseGPT(density=0.5)._calibration_batches(trainer)
