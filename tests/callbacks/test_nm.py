"""NMSparsity: exact n-of-m groups, ASP one-shot and periodic re-selection, the harness, bad input."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse.callbacks import NMSparsity
from tests import harness


def _case(name: str, **kwargs) -> harness.AlgorithmCase:
    return harness.AlgorithmCase(
        name, lambda: [NMSparsity(**kwargs)],
        [{"class_path": "lightning_sparse.callbacks.NMSparsity", "init_args": kwargs}],
    )


CASES = [
    _case("2:4-at-step-4", n=2, m=4, at_step=4),
    _case("1:4-reselect-2", n=1, m=4, at_step=2, reselect_every=2),
    _case("4:8", n=4, m=8),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_harness_fit_and_resume(case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path)
    harness.check_pickle(case)
    harness.check_yaml(case)


@pytest.mark.ddp
def test_harness_ddp(tmp_path):
    harness.check_ddp(CASES[1], tmp_path)


# at_step=5 and reselect_every=2: the selection at step 5 is not on the reselection grid of 2
FINAL = [_case("2:4-at-step-5", n=2, m=4, at_step=5), _case("1:4-at-5-reselect-2", n=1, m=4, at_step=5,
                                                              reselect_every=2)]


@pytest.mark.parametrize("case", FINAL, ids=[c.name for c in FINAL])
def test_harness_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path)


@pytest.mark.parametrize("case", [CASES[0], FINAL[1]], ids=[CASES[0].name, FINAL[1].name])
def test_harness_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path)


def test_every_group_keeps_exactly_n_of_m():
    torch.manual_seed(0)
    model, nm = harness.HarnessNet(), NMSparsity(n=2, m=4)
    pl.Trainer(max_steps=3, callbacks=[nm], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False).fit(model, harness.harness_data())
    for name, param in model.named_parameters():
        if name in nm.masks.params:
            groups = (param.detach().reshape(param.shape[0], -1) != 0).reshape(-1, 4).sum(-1)
            assert (groups <= 2).all() and (nm.masks.masks[name].reshape(-1, 4).sum(-1) == 2).all()


def test_fixed_mask_never_changes_after_selection():
    nm = NMSparsity(n=2, m=4, at_step=1)
    assert [nm.should_update(s) for s in range(4)] == [False, True, False, False]
    periodic = NMSparsity(n=2, m=4, at_step=1, reselect_every=2)
    assert [periodic.should_update(s) for s in range(6)] == [False, True, False, True, False, True]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 4, "m": 4}, ValueError, "n must be smaller than m"),
        ({"n": 0, "m": 4}, ValueError, "n must be >= 1"),
        ({"n": 2.0, "m": 4}, TypeError, "n must be an int"),
        ({"n": 2, "m": 4, "reselect_every": 0}, ValueError, "reselect_every must be >= 1"),
        ({"n": 2, "m": 4, "at_step": -1}, ValueError, "at_step must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NMSparsity(**kwargs)


def test_m_not_dividing_the_input_dimension_names_the_layer():
    trainer = pl.Trainer(max_steps=1, callbacks=[NMSparsity(n=1, m=3)], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"n=1, m=3 needs the input dimension to be divisible by m=3, "
                       r"but conv.weight: a Conv1d weight stored as \(8, 4, 2\), \(out, in\) view 8x8 has 8 inputs"):
        trainer.fit(harness.HarnessNet(), harness.harness_data())
