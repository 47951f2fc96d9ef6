"""Exact top-k across shards (single process: the shards are the pieces of one tensor), shard checks, traffic."""

import pytest
import torch

from lightning_sparse.core.masks import topk_flat
from lightning_sparse.core.patterns import parse_pattern
from lightning_sparse.distributed import TRAFFIC, Shard, check_shard, distributed_topk, gather_rows, local


@pytest.mark.parametrize("kind", ["normal", "few-values", "float64", "signed-zeros"])
def test_equals_one_process_topk_with_its_tie_break(kind):
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(1, 400, (1,), generator=generator))
        if kind == "normal":
            x = torch.randn(n, generator=generator)
        elif kind == "few-values":
            x = torch.randint(-3, 3, (n,), generator=generator).float()
        elif kind == "float64":
            x = torch.randn(n, generator=generator, dtype=torch.float64)
        else:
            x = torch.randint(0, 2, (n,), generator=generator).float() * -0.0
        k = int(torch.randint(0, n + 1, (1,), generator=generator))
        pieces = list(torch.split(x, max(1, n // 3)))
        got = torch.cat([m.reshape(-1) for m in distributed_topk(pieces, k)])
        assert torch.equal(got, topk_flat(x, k)), (n, k)


def test_traffic_does_not_grow_with_the_layer():
    moved = []
    for n in (1_000, 1_000_000):
        before = TRAFFIC["elements"]
        distributed_topk([torch.randn(n)], n // 3)
        moved.append(TRAFFIC["elements"] - before)
    assert moved[0] == moved[1] == 1 + 4 * 256 + 1  # sizes, 4 histograms, the tie counts of 1 rank


def test_k_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\], got 5"):
        distributed_topk([torch.ones(4)], 5)


def test_a_group_straddling_a_shard_boundary_is_refused():
    shard = Shard((10, 8), row_offset=5, rows=5, group=None)
    with pytest.raises(ValueError, match=r"w is sharded on dim 0 \(shape \(10, 8\); this rank holds rows 5 to 10\), "
                                         r"which splits its blocks of 4 rows"):
        check_shard(parse_pattern("4x4"), "w", shard)
    with pytest.raises(ValueError, match=r"splits its groups of m=4 along dim 0 \(its input dimension\)"):
        check_shard(parse_pattern("2:4").for_layout(True), "w", shard, transposed=True)
    check_shard(parse_pattern("2:4"), "w", shard)  # a Linear's groups run along dim 1: inside every row
    check_shard(parse_pattern("4x4"), "w", Shard((10, 8), row_offset=8, rows=2, group=None))  # the last, short shard


def test_plain_tensors_pass_through():
    x = torch.ones(3)
    assert local(x) is x and gather_rows(x, Shard((3,), 0, 3, None)) is x


def test_sharded_selection_needs_every_target_sharded_and_no_global_nm():
    from lightning_sparse.distributed import select_sharded_masks

    scores, shapes = {"w": torch.rand(4, 4)}, {"w": (4, 4)}
    with pytest.raises(ValueError, match="under FSDP2 every target must be sharded, but w is a plain tensor"):
        select_sharded_masks(scores, {"w": 0.5}, {"w": parse_pattern("unstructured")}, {"w": None}, shapes)
    shard = {"w": Shard((4, 4), 0, 4, None)}
    with pytest.raises(ValueError, match="distribution 'global' cannot be used with an N:M pattern"):
        select_sharded_masks(scores, {"w": 0.5}, {"w": parse_pattern("2:4")}, shard, shapes, global_density=0.5)
    mask = select_sharded_masks(scores, {"w": 0.25}, {"w": parse_pattern("unstructured")}, shard, shapes)["w"]
    assert torch.equal(mask, topk_flat(scores["w"].reshape(-1), 4).reshape(4, 4))


def test_group_shards_follow_the_parameters_rows():
    from lightning_sparse.distributed import group_shard

    assert group_shard(None, 4, 3) is None
    assert group_shard(Shard((12, 8), 8, 4, None), 4, 3) == Shard((3,), 2, 1, None)
    assert group_shard(Shard((10, 8), 8, 2, None), 2, 5) == Shard((5,), 4, 1, None)
    with pytest.raises(ValueError, match=r"this rank holds rows 6 to 12 of \(12, 8\), which splits its groups of "
                                         r"4 rows"):
        group_shard(Shard((12, 8), 6, 6, None), 4, 3)


def test_rows_and_wholes_without_a_process_group():
    from lightning_sparse.distributed import all_reduce_max, rows_of, whole_of

    whole = torch.arange(12).reshape(6, 2)
    assert torch.equal(rows_of(whole, Shard((6, 2), 2, 3, None)), whole[2:5])
    assert rows_of(whole, None) is whole and whole_of(whole, None) is whole
    values = torch.tensor([1.0, -2.0])
    assert torch.equal(all_reduce_max(values, None), values) and all_reduce_max(values, None) is not values


@pytest.mark.parametrize("kind", ["normal", "few-values", "float64"])
def test_each_tensor_selected_on_its_own_equals_one_process_topk(kind):
    from lightning_sparse.distributed import distributed_topk_each

    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        sizes = torch.randint(1, 300, (4,), generator=generator).tolist()
        if kind == "few-values":
            xs = [torch.randint(-3, 3, (n,), generator=generator).float() for n in sizes]
        else:
            dtype = torch.float64 if kind == "float64" else torch.float32
            xs = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
        ks = [int(torch.randint(0, n + 1, (1,), generator=generator)) for n in sizes]
        before = TRAFFIC["elements"]
        got = distributed_topk_each(xs, ks)
        nbytes = 8 if kind == "float64" else 4
        assert TRAFFIC["elements"] - before == 4 + nbytes * 4 * 256 + 4  # sizes, histograms, tie counts: once
        for x, k, mask in zip(xs, ks, got, strict=True):
            assert torch.equal(mask, topk_flat(x, k)), (x.numel(), k)


def test_each_selection_needs_one_k_per_tensor_in_range():
    from lightning_sparse.distributed import distributed_topk_each

    with pytest.raises(ValueError, match=r"ks must give one k per tensor: 2 tensors, got 1 ks"):
        distributed_topk_each([torch.ones(3), torch.ones(2)], [1])
    with pytest.raises(ValueError, match=r"k must be in \[0, 2\], got 3"):
        distributed_topk_each([torch.ones(3), torch.ones(2)], [1, 3])
