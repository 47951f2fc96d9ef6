"""SparseGPT passes the shared harness: exact budgets, strict checkpoints, exact resume (no re-pruning), DDP."""

import pytest
import torch

from lightning_sparse.callbacks import SparseGPT
from tests import harness


def _case(name: str, **kwargs) -> harness.AlgorithmCase:
    yaml_config = [{"class_path": "lightning_sparse.callbacks.SparseGPT", "init_args": kwargs}]
    return harness.AlgorithmCase(name, lambda: [SparseGPT(**kwargs)], yaml_config)


CASES = [
    _case("unstructured-fit-start", density=0.3),
    _case("2:4-fit-end-one-pass", nm="2:4", at="fit_end", sequential=False, block_size=8),
    _case("2:4-refit-reselect", nm="2:4", refit=True, reselect=1, calibration_batches=2),
    _case("linear-fit-end", density=0.5, at="fit_end", include=["body.*.weight", "head.weight"], calibration_batches=2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)


@pytest.mark.ddp
def test_ddp(tmp_path):
    harness.check_ddp(_case("2:4", nm="2:4"), tmp_path)


FINAL = [CASES[0], CASES[1], _case("2:4-at-step-5", nm="2:4", at=5)]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


# pruned at fit start; pruned at fit end (after the early stop too: its checkpoint keeps the state before)
RESUME = [CASES[0], CASES[1]]


@pytest.mark.parametrize("case", RESUME, ids=[c.name for c in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pickle_and_yaml(case):
    harness.check_pickle(case)
    harness.check_yaml(case)


class _Recording(SparseGPT):
    def compute_masks(self, trainer, pl_module, step):
        self.before = {name: p.detach().clone() for name, p in self.masks.params.items()}
        return super().compute_masks(trainer, pl_module, step)


def test_checkpoint_says_pruned_and_kept_weights_moved(tmp_path):
    model, callback = harness.fit(harness.AlgorithmCase("rec", lambda: [_Recording(nm="2:4", at="fit_end")]), tmp_path)
    state = torch.load(tmp_path / f"epoch={harness.EPOCHS - 1}.ckpt", weights_only=True)["callbacks"]
    assert state[callback.state_key]["pruned"] is True
    for name, param in callback.masks.params.items():
        kept = callback.masks.masks[name]
        assert (param[kept] != callback.before[name][kept]).float().mean() > 0.5, name
