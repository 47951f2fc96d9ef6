"""DynamicSparseTraining, its presets and every drop x grow combination pass the shared harness.

The harness runs 8 optimizer steps and resumes from step 4; updates every 2 or 3 steps with ``stop_at=1.0`` put
an update after the resume point (step 6), so resume is checked across an update.
"""

import itertools

import pytest

from lightning_sparse.callbacks import MEST, SET, SNFS, DynamicSparseTraining, RigL, SparsityScheduler
from lightning_sparse.core.criteria import DROP_CRITERIA, GROW_CRITERIA
from tests import harness

PATH = "lightning_sparse.callbacks"


def _case(name: str, cls: type = DynamicSparseTraining, scheduler: dict | None = None, **kwargs):
    args = {"density": 0.1, "update_every": 2, "stop_at": 1.0, **kwargs}

    def make():
        return ([SparsityScheduler(**scheduler)] if scheduler else []) + [cls(**args)]

    yaml_config = [{"class_path": f"{PATH}.SparsityScheduler", "init_args": scheduler}] if scheduler else []
    yaml_config.append({"class_path": f"{PATH}.{cls.__name__}", "init_args": args})
    return harness.AlgorithmCase(name, make, yaml_config)


PRESETS = [
    _case("SET", SET, update_every=3),
    _case("RigL", RigL, update_every=3),
    _case("SNFS", SNFS, update_every=3),
    _case("MEST", MEST, update_every=3),
]
GRID = [_case(f"{d}-x-{g}", drop=d, grow=g) for d, g in itertools.product(DROP_CRITERIA, GROW_CRITERIA)]
VARIANTS = [
    _case("set-gradient-4x4-uniform", drop="set", grow="gradient", pattern="4x4", distribution="uniform", density=0.25),
    _case("magnitude-random-global-init-magnitude", grow="random", distribution="global", init="magnitude"),
    _case("snip-momentum-redistribution", drop="snip", grow="momentum", redistribution="momentum"),
    _case("rigl-scheduled-drop-fraction", RigL, scheduler={"density": 0.1, "initial_density": 0.1,
                                                             "drop_fraction": 0.5}),
    _case("static", update_every=None),
    _case("rigl-scale-init", RigL, update_every=3, scale_init=True),
]
DDP = [*PRESETS, _case("random-x-random", drop="random", grow="random")]
ALL = PRESETS + GRID + VARIANTS


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
@pytest.mark.parametrize("case", DDP, ids=[c.name for c in DDP])
def test_ddp(case, tmp_path):
    harness.check_ddp(case, tmp_path)


# DST is sparse at its final density from step 0, whatever update_every is (a scheduler's ramp is not used)
FINAL = [*PRESETS, _case("rigl-scheduled-every-4", RigL, update_every=4, scheduler={"density": 0.1, "end": 0.75})]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


RESUME = [PRESETS[0], PRESETS[1], VARIANTS[2], VARIANTS[3]]  # SET, RigL, momentum redistribution, scheduled


@pytest.mark.parametrize("case", RESUME, ids=[c.name for c in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)
