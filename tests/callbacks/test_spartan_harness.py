"""Spartan passes the shared harness: exact budgets, baked export, resume (also inside the frozen phase), DDP.

The harness runs 8 optimizer steps and resumes from step 4. With the default ``freeze_at=0.8`` the mask freezes at
step 6, after the resume point; ``freeze_at=3`` freezes it before, so the resumed run starts inside the frozen phase.
"""

import pytest

from lightning_sparse.callbacks import SparsityScheduler, Spartan
from tests import harness

PATH = "lightning_sparse.callbacks"
SHARPNESS = {"type": "linear", "initial": 1.0, "final": 40.0, "start": 0, "end": 0.75}


def _case(name: str, scheduler: dict | None = None, **kwargs) -> harness.AlgorithmCase:
    def make():
        return ([SparsityScheduler(**scheduler)] if scheduler else []) + [Spartan(**kwargs)]

    yaml_config = [{"class_path": f"{PATH}.SparsityScheduler", "init_args": scheduler}] if scheduler else []
    yaml_config.append({"class_path": f"{PATH}.Spartan", "init_args": kwargs})
    return harness.AlgorithmCase(name, make, yaml_config)


CASES = [
    _case("default-schedules", density=0.25),
    _case("frozen-before-resume", density=0.25, sharpness=5.0, freeze_at=3),
    _case("erk-update-every-3", density=0.25, distribution="erk", update_every=3, freeze_at=None),
    _case("global-4x4-scheduled", {"density": 0.25, "end": 0.25, "sharpness": SHARPNESS}, pattern="4x4",
          distribution="global", freeze_at=0.375),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
def test_ddp(tmp_path):
    harness.check_ddp(CASES[1], tmp_path)


# the default ramp ends at step 2 (20% of 8), the scheduler's at step 5: neither on the update grid of 3
FINAL = [
    _case("default-ramp-every-3", density=0.25, update_every=3, freeze_at=None),
    _case("scheduled-end-5-every-3", {"density": 0.25, "end": 5}, distribution="global", update_every=3,
          freeze_at=0.75),
]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


RESUME = [CASES[1], FINAL[1]]


@pytest.mark.parametrize("case", RESUME, ids=[c.name for c in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
