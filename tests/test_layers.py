"""The layer-kind registry: built-in kinds, HF Conv1D's transposed view, register_layer and its errors."""

import re

import pytest
import torch
from torch import nn

from lightning_sparse.core.patterns import parse_pattern
from lightning_sparse.layers import (
    check_pattern,
    layer_kind,
    layer_weights,
    matrix_shapes,
    register_layer,
    unregister_layer,
)
from lightning_sparse.targets import select_targets


class Conv1D(nn.Module):
    """Stands in for transformers.pytorch_utils.Conv1D (same name; the registry also checks the module)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


Conv1D.__module__ = "transformers.pytorch_utils"


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return x @ self.w


def test_builtin_kinds_and_matrix_views():
    assert layer_kind(nn.Linear(3, 5)).matrix_shape((5, 3)) == (5, 3)
    assert layer_kind(nn.Conv2d(3, 8, 3)).name == "Conv2d"
    assert layer_kind(nn.MultiheadAttention(8, 2)).weights[0] == "in_proj_weight"
    assert layer_kind(nn.LayerNorm(4)) is None
    conv1d = Conv1D(nf=12, nx=4)
    kind = layer_kind(conv1d)
    assert kind.name == "Conv1D" and kind.transposed and kind.matrix_shape((4, 12)) == (12, 4)
    assert torch.equal(kind.as_matrix(conv1d.weight), conv1d.weight.t())
    assert torch.equal(kind.from_matrix(kind.as_matrix(conv1d.weight), (4, 12)), conv1d.weight)


def test_a_class_named_conv1d_outside_transformers_is_not_hf_conv1d():
    class Other(nn.Module):
        pass

    Other.__name__ = "Conv1D"
    assert layer_kind(Other()) is None


def test_nm_runs_along_the_input_dimension_of_a_conv1d():
    weight = Conv1D(nf=8, nx=16).weight.detach()
    pattern = parse_pattern("2:4").for_layout(True)
    mask = pattern.topk_mask(weight.abs(), 0.5)
    assert mask.shape == (16, 8)
    assert (mask.t().reshape(8, -1, 4).sum(-1) == 2).all()  # 2 of every 4 consecutive inputs, per output
    assert torch.equal(pattern.expand(pattern.compress(mask), (16, 8)), mask)
    assert str(pattern) == "2:4"
    assert parse_pattern("4x8").for_layout(True) == parse_pattern("8x4")


def test_matrix_shapes_and_pattern_errors_name_the_kind_and_view():
    model = nn.Sequential(Conv1D(nf=8, nx=6), nn.Linear(8, 4))
    assert matrix_shapes(model, ["0.weight", "1.weight", "0.bias"]) == {"0.weight": (8, 6), "1.weight": (4, 8),
                                                                       "0.bias": (8, 1)}
    kind = layer_weights(model)["0.weight"].kind
    with pytest.raises(ValueError, match=r"m=4, but 0.weight: a Conv1D weight stored as \(6, 8\), \(out, in\) view "
                                         r"8x6 has 6 inputs"):
        check_pattern(parse_pattern("2:4"), "0.weight", kind, (6, 8))
    with pytest.raises(ValueError, match=r"pattern=.4x4. \(4x4 blocks of the \(out, in\) view\) does not tile "
                                         r"0.weight: "
                                         r"a Conv1D weight stored as \(6, 8\), \(out, in\) view 8x6"):
        check_pattern(parse_pattern("4x4"), "0.weight", kind, (6, 8))


@pytest.mark.parametrize(("pattern", "argument", "shape", "example"), [
    ("4x4", None, (8, 6), "(e.g. pattern='2x2')"),
    ("8x4", None, (12, 6), "(e.g. pattern='6x3')"),
    ("7x7", "tile_size=7", (64, 48), "(e.g. tile_size=4)"),
    ("2:4", None, (8, 6), "(e.g. pattern='1:2', the same density)"),
    ("2:4", "n=2, m=4", (8, 6), "(e.g. n=1, m=2, the same density)"),
    ("2:4", "nm='2:4'", (8, 6), "(e.g. nm='1:2', the same density)"),
])
def test_pattern_errors_give_a_value_that_fits(pattern, argument, shape, example):
    with pytest.raises(ValueError, match=re.escape(example)):
        check_pattern(parse_pattern(pattern), "fc.weight", layer_weights(nn.Linear(shape[1], shape[0]))["weight"].kind,
                      shape, argument)


def test_pattern_errors_without_a_fitting_value_only_say_exclude():
    with pytest.raises(ValueError, match=r"has 9 inputs; exclude 'fc.weight' or choose another pattern$"):
        check_pattern(parse_pattern("2:4"), "fc.weight", None, (8, 9))
    with pytest.raises(ValueError, match=r"divide 7 and 5, or exclude 'fc.weight'$"):
        check_pattern(parse_pattern("4x4"), "fc.weight", None, (7, 5))


def test_register_layer_makes_a_user_class_a_default_target():
    model = nn.Sequential(Transposed(), nn.ReLU())
    with pytest.raises(ValueError, match="no parameter left to sparsify"):
        select_targets(model)
    register_layer(Transposed, weight="w", transposed=True)
    try:
        assert select_targets(model) == ["0.w"]
        assert matrix_shapes(model, ["0.w"]) == {"0.w": (4, 8)}
    finally:
        unregister_layer(Transposed)


def test_register_layer_errors():
    with pytest.raises(TypeError, match=r"register_layer\(cls=...\) needs an nn.Module subclass, got 3"):
        register_layer(3)
    with pytest.raises(TypeError, match=r"register_layer\(weight=...\) needs a parameter name or a list of names, "
                                        r"got \[\]"):
        register_layer(Transposed, weight=[])
    with pytest.raises(ValueError, match=r"register_layer\(transposed=True\) takes one weight name"):
        register_layer(Transposed, weight=["w", "v"], transposed=True)
    register_layer(Transposed, weight="weight")
    try:
        with pytest.raises(ValueError, match=r"register_layer\(Transposed, weight=\('weight',\)\): Transposed has no "
                                             r"parameter 'weight'; its parameters are \['w'\]"):
            layer_kind(Transposed())
    finally:
        unregister_layer(Transposed)
