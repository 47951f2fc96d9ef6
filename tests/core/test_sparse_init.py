
import pytest
import torch

from lightning_sparse.core.sparse_init import scale_to_active_fan_in_


def test_conv_units_get_their_output_variance_back():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < 0.1
    x = torch.randn(4096, 32 * 9, generator=generator)
    dense_var = (x @ weight.reshape(64, -1).t()).var()
    sparse = scale_to_active_fan_in_(weight * mask, mask)
    sparse_var = (x @ sparse.reshape(64, -1).t()).var()
    assert 0.85 < float(sparse_var / dense_var) < 1.15
    assert torch.equal(sparse != 0, mask)


def test_units_without_active_inputs_and_vectors_are_left_alone():
    weight = torch.ones(2, 3)
    mask = torch.tensor([[False] * 3, [True, False, False]])
    assert scale_to_active_fan_in_(weight, mask)[0].tolist() == [1.0, 1.0, 1.0]
    bias = torch.ones(3)
    assert scale_to_active_fan_in_(bias, torch.ones(3, dtype=torch.bool)).tolist() == [1.0, 1.0, 1.0]


def test_mask_of_another_shape_is_rejected():
    with pytest.raises(ValueError, match=r"mask must have the weight's shape \(2, 3\), got \(3, 2\)"):
        scale_to_active_fan_in_(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
