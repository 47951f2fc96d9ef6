"""The criterion registry, SET's sign-split drop and SNFS redistribution (lightning_sparse.core.criteria)."""


import pytest
import torch

from lightning_sparse.callbacks import DynamicSparseTraining, register_criterion
from lightning_sparse.core.criteria import check_criterion, check_scores, drop_by_sign, redistribute
from tests import harness

VALUES = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize(
    ("n", "dropped"),
    [
        (0, []),
        (4, [-2.0, -1.0, 1.0, 2.0]),
        (3, [-1.0, 1.0, 2.0]),  # odd: the extra one from the non-negative side
        (10, VALUES.tolist()),
    ],
)
def test_set_drop_counts_per_sign(n, dropped):
    kept = drop_by_sign(VALUES, torch.ones(10, dtype=torch.bool), n)
    assert sorted(VALUES[~kept].tolist()) == dropped


def test_set_drop_takes_the_rest_from_the_other_sign_and_ignores_inactive():
    values = torch.tensor([-0.5, 0.5, 1.0, 2.0, 3.0, -0.25])
    mask = torch.tensor([True, True, True, True, True, False])  # one active negative
    kept = drop_by_sign(values, mask, 4)
    assert sorted(values[mask & ~kept].tolist()) == [-0.5, 0.5, 1.0, 2.0]
    assert not kept[5]
    zeros = drop_by_sign(torch.tensor([0.0, -1.0, 2.0]), torch.ones(3, dtype=torch.bool), 1)
    assert zeros.tolist() == [False, True, True]  # zero counts as non-negative
    with pytest.raises(ValueError, match=r"n must be in \[0, 5\] \(the active count\), got 6"):
        drop_by_sign(values, mask, 6)


def test_redistribute_caps_and_spreads_overflow_exactly():
    drops = {"a": 10, "b": 10, "c": 10}
    grows = redistribute(drops, capacities={"a": 5, "b": 100, "c": 100}, weights={"a": 8.0, "b": 1.0, "c": 1.0})
    assert grows == {"a": 5, "b": 13, "c": 12}  # a capped; 25 split 12.5/12.5, tie to the earlier layer
    assert sum(grows.values()) == 30
    shares = redistribute({"a": 3, "b": 4}, capacities={"a": 10, "b": 10}, weights={"a": 1.0, "b": 2.0})
    assert shares == {"a": 2, "b": 5}  # 7/3 and 14/3 by largest remainder


def test_redistribute_zero_weights_use_free_room():
    grows = redistribute({"a": 4, "b": 4}, capacities={"a": 2, "b": 6}, weights={"a": 1.0, "b": 0.0})
    assert grows == {"a": 2, "b": 6}
    assert redistribute({"a": 3}, {"a": 3}, {"a": 0.0}) == {"a": 3}
    with pytest.raises(ValueError, match="cannot hold the 5 weights to regrow"):
        redistribute({"a": 5}, {"a": 4}, {"a": 1.0})


def _neg_magnitude(param, grad, optimizer_state):
    return -param.detach().abs()


def test_register_criterion_and_use_it_by_name_in_yaml():
    register_criterion("test_neg_magnitude", _neg_magnitude)
    assert check_criterion("drop", "test_neg_magnitude", ("magnitude",)) == "test_neg_magnitude"
    args = {"drop": "test_neg_magnitude", "grow": "random", "density": 0.1, "update_every": 2, "stop_at": 1.0}
    case = harness.AlgorithmCase(
        "registered", lambda: [DynamicSparseTraining(**args)],
        [{"class_path": "lightning_sparse.callbacks.DynamicSparseTraining", "init_args": args}],
    )
    harness.check_yaml(case)
    with pytest.raises(ValueError, match=r"drop must be one of \[.*'test_neg_magnitude'\].*got 'nope'"):
        DynamicSparseTraining(drop="nope", density=0.1)


@pytest.mark.parametrize(
    ("name", "fn", "error", "match"),
    [
        ("magnitude", _neg_magnitude, ValueError, "criterion name 'magnitude' is built in"),
        (3, _neg_magnitude, TypeError, "criterion name must be a string, got int: 3"),
        ("x", 1.0, TypeError, r"criterion 'x' must be callable \(param, grad, optimizer_state\) -> scores"),
    ],
)
def test_register_criterion_rejects_bad_input(name, fn, error, match):
    with pytest.raises(error, match=match):
        register_criterion(name, fn)


def test_check_scores_names_the_criterion_and_both_shapes():
    param = torch.zeros(2, 3)
    assert check_scores("x", torch.ones(2, 3), param).shape == (2, 3)
    with pytest.raises(ValueError, match=r"criterion '_neg_magnitude' returned scores of shape float"):
        check_scores(_neg_magnitude, 1.0, param)
