import pytest
import torch

from lightning_sparse.core.patterns import NM, Blocks, Unstructured, parse_pattern


@pytest.mark.parametrize(
    ("text", "expected"),
    [("unstructured", Unstructured()), ("4x4", Blocks(4, 4)), ("16x32", Blocks(16, 32)), ("2:4", NM(2, 4)),
     (" 1:8 ", NM(1, 8))],
)
def test_parse(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(expected) is expected


@pytest.mark.parametrize("text", ["blocks", "4x", "2:2", "4:2", "0:4", "0x4"])
def test_parse_rejects_unknown(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="pattern must be a string"):
        parse_pattern(4)


def test_block_check_names_layer_and_shape():
    with pytest.raises(ValueError, match=r"4x4 does not divide fc.weight of shape \(6, 8\).* \(e.g. pattern '2x2'\)"):
        Blocks(4, 4).check("fc.weight", (6, 8))
    Blocks(2, 4).check("fc.weight", (6, 8))


def test_nm_check_needs_divisible_inputs():
    with pytest.raises(ValueError, match="divisible by m=4; exclude 'conv.weight' or choose another pattern$"):
        NM(2, 4).check("conv.weight", (8, 3, 3, 3))
    with pytest.raises(ValueError, match=r"divisible by m=4; .* \(e.g. pattern '1:2', the same density\)$"):
        NM(2, 4).check("conv.weight", (8, 3, 2, 3))
    NM(2, 4).check("conv.weight", (8, 4, 3, 3))


def test_block_topk_keeps_whole_blocks_exactly():
    scores = torch.arange(64.0).reshape(8, 8)
    mask = Blocks(4, 4).topk_mask(scores, 0.5)
    assert mask.sum() == 32
    assert mask[4:, :].all() and not mask[:4, :].any()  # the two bottom blocks have the higher means
    compressed = Blocks(4, 4).compress(mask)
    assert compressed.tolist() == [False, False, True, True]
    assert torch.equal(Blocks(4, 4).expand(compressed, (8, 8)), mask)


def test_block_topk_on_conv_uses_matrix_view():
    scores = torch.rand(8, 2, 2, 2)
    mask = Blocks(2, 4).topk_mask(scores, 0.25)
    assert mask.shape == scores.shape and mask.sum() == 2 * 8  # 2 of 8 blocks
    grid = mask.reshape(8, 8).reshape(4, 2, 2, 4).transpose(1, 2).reshape(4, 2, -1)
    assert ((grid.all(-1)) | (~grid.any(-1))).all()  # every block entirely kept or entirely dropped


def test_nm_keeps_n_per_group_with_index_tie_break():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 5.0, 4.0, 3.0]])
    mask = NM(2, 4).topk_mask(scores, 0.5)
    assert mask.int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0]]
    assert NM(2, 4).topk_mask(scores, 0.75).sum() == 6  # gradual: 3 of 4 per group
    assert NM(2, 4).topk_mask(scores, 0.1).sum() == 4  # never below n per group


def test_unstructured_round_trip_and_exact_count():
    scores = torch.randn(7, 13)
    mask = Unstructured().topk_mask(scores, 0.3)
    assert mask.sum() == round(0.3 * 91)
    assert torch.equal(Unstructured().expand(Unstructured().compress(mask), mask.shape), mask)
