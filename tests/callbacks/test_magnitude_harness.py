"""MagnitudePruning passes the shared harness with every pattern and distribution."""

import pytest

from lightning_sparse.callbacks import MagnitudePruning, SparsityScheduler
from tests import harness


def _case(name: str, scheduled: bool, **kwargs) -> harness.AlgorithmCase:
    pruning_args = {"update_every": 2, **kwargs}
    if scheduled:
        scheduler_args = {"density": 0.5 if kwargs.get("pattern") == "2:4" else 0.25, "start": 0, "end": 0.75}

        def make():
            return [SparsityScheduler(**scheduler_args), MagnitudePruning(**pruning_args)]

        yaml_config = [
            {"class_path": "lightning_sparse.callbacks.SparsityScheduler", "init_args": scheduler_args},
            {"class_path": "lightning_sparse.callbacks.MagnitudePruning", "init_args": pruning_args},
        ]
    else:

        def make():
            return [MagnitudePruning(**pruning_args)]

        yaml_config = [{"class_path": "lightning_sparse.callbacks.MagnitudePruning", "init_args": pruning_args}]
    return harness.AlgorithmCase(name, make, yaml_config)


CASES = [
    _case("gmp-unstructured", True),
    _case("gmp-4x4", True, pattern="4x4"),
    _case("gmp-2:4", True, pattern="2:4"),
    _case("gmp-erk", True, distribution="erk"),
    _case("gmp-global-4x4", True, pattern="4x4", distribution="global"),
    _case("one-shot-step-4", False, density=0.3, at_step=4),
    _case("imp-rewind", True, rewind_to=0),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
def test_ddp(case, tmp_path):
    harness.check_ddp(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
