"""TopKAST passes the shared harness: exact budgets, baked export, exact resume across updates, DDP."""

import pytest

from lightning_sparse.callbacks import SparsityScheduler, TopKAST
from tests import harness

PATH = "lightning_sparse.callbacks"


def _case(name: str, scheduler: dict | None = None, **kwargs) -> harness.AlgorithmCase:
    def make():
        return ([SparsityScheduler(**scheduler)] if scheduler else []) + [TopKAST(**kwargs)]

    yaml_config = [{"class_path": f"{PATH}.SparsityScheduler", "init_args": scheduler}] if scheduler else []
    yaml_config.append({"class_path": f"{PATH}.TopKAST", "init_args": kwargs})
    return harness.AlgorithmCase(name, make, yaml_config)


CASES = [
    _case("dense-backward", density=0.25, update_every=3),
    _case("backward-0.5-4x4", density=0.25, backward_density=0.5, pattern="4x4", update_every=3),
    _case("global-scheduled", {"density": 0.25, "end": 0.75}, backward_density=0.5, distribution="global",
          update_every=2),
    _case("2:4-backward-3:4", density=0.5, backward_density=0.75, pattern="2:4", update_every=3),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
def test_ddp(tmp_path):
    harness.check_ddp(CASES[1], tmp_path)


# the schedule ends at step 6 (0.75 of 8 steps) or 5; update_every=4 and 3 do not divide it
FINAL = [
    _case("scheduled-every-4", {"density": 0.25, "end": 0.75}, update_every=4),
    _case("scheduled-global-4x4-every-3", {"density": 0.25, "end": 5}, backward_density=0.5, pattern="4x4",
          distribution="global", update_every=3),
]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


# the early stop at step 4 falls between the updates at 3 and 6 of the second case: a fit-end update, then the bake
RESUME = [CASES[1], _case("scheduled-every-3", {"density": 0.25, "end": 0.75}, update_every=3)]


@pytest.mark.parametrize("case", RESUME, ids=[c.name for c in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
