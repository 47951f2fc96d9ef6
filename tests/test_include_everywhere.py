"""``include`` / ``exclude`` take one glob string or a list of them at every entry point (one shared coercion,
``lightning_sparse.targets.as_globs``), with the same TypeError for anything else."""

import pytest
import torch
from torch import nn

from lightning_sparse import export_sparse, to_sparse_inference
from lightning_sparse.callbacks import (
    MEST,
    SET,
    SNFS,
    MagnitudePruning,
    NMSparsity,
    RigL,
    SparseExport,
    SparseGPT,
    Spartan,
    Supermask,
    TopKAST,
)
from lightning_sparse.targets import select_targets

CALLBACKS = [MagnitudePruning, RigL, SET, SNFS, MEST, Spartan, TopKAST, Supermask, NMSparsity, SparseGPT]


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_callbacks_take_a_string_or_a_list(cls, argument):
    kwargs = {NMSparsity: {}, SparseGPT: {"nm": "2:4"}}.get(cls, {"density": 0.5})
    assert getattr(cls(**kwargs, **{argument: "net.*.weight"}), argument) == ["net.*.weight"]
    assert getattr(cls(**kwargs, **{argument: ["a", "b"]}), argument) == ["a", "b"]
    with pytest.raises(TypeError, match=rf"{argument} must be a glob string or a list of glob strings, got 3"):
        cls(**kwargs, **{argument: 3})


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    model[0].weight.data[:, 16:] = 0
    return model


def test_export_inference_and_targets_take_a_string_or_a_list(tmp_path):
    model = _model()
    assert SparseExport(include="0").include == ["0"]
    assert export_sparse(model, tmp_path / "a", pattern="16x16", include="0").converted == ["0"]
    assert export_sparse(model, tmp_path / "b", pattern="16x16", include=["0"]).converted == ["0"]
    assert type(to_sparse_inference(_model(), pattern="16x16", include="0")[0]).__name__ == "SparseLinear"
    assert select_targets(model, include="0.weight") == select_targets(model, include=["0.weight"]) == ["0.weight"]
    message = "include must be a glob string or a list of glob strings, got 3"
    for call in (lambda: SparseExport(include=3), lambda: export_sparse(model, tmp_path / "c", include=3),
                 lambda: to_sparse_inference(_model(), include=3), lambda: select_targets(model, include=3)):
        with pytest.raises(TypeError, match=message):
            call()
