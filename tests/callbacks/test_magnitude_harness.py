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


# update_every=4 does not divide the schedule's end step 6 (end=0.75 of 8 steps), nor at_step=5
FINAL = [
    _case("gmp-every-4", True, update_every=4),
    _case("gmp-global-4x4-every-4", True, update_every=4, pattern="4x4", distribution="global"),
    _case("imp-rewind-every-4", True, update_every=4, rewind_to=0),
    _case("one-shot-step-5", False, density=0.3, at_step=5),
]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


# global 4x4, IMP rewind, one-shot, and updates every 3: the early stop at step 4 falls between two updates, so the
# masks are updated at fit end (optimizer state untouched) and the checkpoint keeps the state from before that update
RESUME = [CASES[4], CASES[6], FINAL[3], _case("gmp-every-3", True, update_every=3)]


@pytest.mark.parametrize("case", RESUME, ids=[c.name for c in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
