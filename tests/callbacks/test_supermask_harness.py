"""Supermask passes the shared harness: exact tile budgets, baked export, exact resume, DDP, pickle and YAML."""

import pytest

from lightning_sparse.callbacks import SparsityScheduler, Supermask
from tests import harness

PATH = "lightning_sparse.callbacks"


def _case(name: str, scheduler: dict | None = None, **kwargs) -> harness.AlgorithmCase:
    def make():
        return ([SparsityScheduler(**scheduler)] if scheduler else []) + [Supermask(**kwargs)]

    yaml_config = [{"class_path": f"{PATH}.SparsityScheduler", "init_args": scheduler}] if scheduler else []
    yaml_config.append({"class_path": f"{PATH}.Supermask", "init_args": kwargs})
    return harness.AlgorithmCase(name, make, yaml_config)


CASES = [
    _case("tile-4x4", density=0.25, tile_size="4x4"),
    _case("scheduled-magnitude-init", {"density": 0.25, "end": 0.75}, tile_size=4, score_init="magnitude"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
def test_ddp(tmp_path):
    harness.check_ddp(CASES[0], tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
