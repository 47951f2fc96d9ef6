"""MaskState: changed positions, optimizer-state clearing, compact state_dict and its checks."""

import pytest
import torch
from torch import nn

from lightning_sparse.core.patterns import Blocks
from lightning_sparse.masking import MaskState


def test_set_masks_returns_changed_positions_and_apply_zeroes_weights():
    layer = nn.Linear(4, 4)
    state = MaskState({"weight": layer.weight})
    mask = torch.eye(4, dtype=torch.bool)
    changed = state.set_masks({"weight": mask})
    assert torch.equal(changed["weight"], ~mask)
    state.apply_to_weights()
    assert torch.equal(layer.weight != 0, mask) and state.density("weight") == 0.25
    assert state.names_with_weights_outside_mask() == []
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert state.names_with_weights_outside_mask() == ["weight"]


def test_clear_optimizer_state_only_at_given_positions():
    layer = nn.Linear(4, 4, bias=False)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = MaskState({"weight": layer.weight})
    where = torch.zeros(4, 4, dtype=torch.bool)
    where[0] = True
    state.clear_optimizer_state([optimizer], {"weight": where})
    moments = optimizer.state[layer.weight]
    assert not moments["exp_avg"][0].any() and moments["exp_avg"][1:].abs().sum() > 0


def test_clear_optimizer_state_of_a_channels_last_conv_matches_the_contiguous_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    conv_last = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    conv_last.load_state_dict(conv.state_dict())
    where = torch.rand(conv.weight.shape) < 0.3
    moments = []
    for layer in (conv, conv_last):
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        layer(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).sum().backward()
        optimizer.step()
        MaskState({"weight": layer.weight}).clear_optimizer_state([optimizer], {"weight": where})
        moments.append(optimizer.state[layer.weight]["momentum_buffer"])
    assert not moments[1].is_contiguous()  # the masked-fill path
    assert torch.equal(moments[0], moments[1])
    assert not moments[0][where].any() and moments[0][~where].abs().sum() > 0


def test_block_masks_are_stored_per_block_and_round_trip():
    layer = nn.Linear(8, 8)
    state = MaskState({"weight": layer.weight}, Blocks(4, 4))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, 4:] = True
    state.set_masks({"weight": mask})
    stored = state.state_dict()
    assert stored["weight"].tolist() == [False, True, False, False]
    fresh = MaskState({"weight": layer.weight}, Blocks(4, 4))
    fresh.load_state_dict(stored)
    assert torch.equal(fresh.masks["weight"], mask)


def test_state_dict_checks_names_and_shapes():
    state = MaskState({"weight": nn.Linear(8, 8).weight}, Blocks(4, 4))
    with pytest.raises(ValueError, match="the checkpoint's masks do not match the model"):
        state.check_state_dict({"other": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for weight has shape \(64,\) but .* needs \(4,\) under pattern 4x4"):
        state.check_state_dict({"weight": torch.ones(64, dtype=torch.bool)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_multiplier_holds_the_mask_as_zeros_and_ones_of_the_weight_dtype(dtype):
    weight = torch.nn.Parameter(torch.randn(6, 5, dtype=dtype))
    state = MaskState({"w": weight})
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    state.set_masks({"w": mask})
    multiplier = state.multiplier("w")
    assert multiplier.dtype == dtype and torch.equal(multiplier, mask.to(dtype))
    state.set_masks({"w": torch.ones(6, 5, dtype=torch.bool)})  # keeps everything: no multiply at all
    assert state.multiplier("w").dtype == torch.bool and state.density("w") == 1.0
