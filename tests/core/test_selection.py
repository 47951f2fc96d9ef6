import pytest
import torch

from lightning_sparse.core.patterns import NM, Blocks, Unstructured
from lightning_sparse.core.selection import select_masks


def test_global_budget_is_exact_across_layers():
    scores = {"a": torch.rand(10, 10), "b": torch.rand(5, 4) + 1.0}
    masks = select_masks(scores, {"a": 0.2, "b": 0.2}, Unstructured(), global_density=0.2)
    assert masks["b"].all()  # b's scores are all higher
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * 120)


def test_global_blocks_and_fixed_layers():
    scores = {"a": torch.rand(8, 8), "b": torch.rand(8, 8), "c": torch.rand(4, 4)}
    masks = select_masks(scores, {"a": 0.5, "b": 0.5, "c": 1.0}, Blocks(4, 4), global_density=0.5, fixed={"c"})
    assert masks["c"].all()
    assert int(masks["a"].sum() + masks["b"].sum()) == 4 * 16


def test_global_with_nm_is_an_error():
    with pytest.raises(ValueError, match="cannot be used with the N:M pattern 2:4"):
        select_masks({"a": torch.rand(4, 4)}, {"a": 0.5}, NM(2, 4), global_density=0.5)
