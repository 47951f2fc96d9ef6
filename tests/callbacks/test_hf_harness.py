"""Every algorithm passes the shared harness on tiny Hugging Face models: GPT-2 (``Conv1D`` weights stored
``(in, out)``, ``lm_head`` tied to the token embedding) and Llama (``nn.Linear``, untied ``lm_head``), trained on dict
batches. Exact budgets (N:M along each layer's input dimension), strict-loading checkpoints, exact resume, 2 DDP
ranks; the output embeddings stay dense."""

import pytest
import torch

pytest.importorskip("transformers")

from lightning_sparse.callbacks import (  # noqa: E402
    MEST,
    SET,
    SNFS,
    MagnitudePruning,
    NMSparsity,
    RigL,
    SparseGPT,
    SparsityScheduler,
    Spartan,
    Supermask,
    TopKAST,
)
from lightning_sparse.export import export_sparse  # noqa: E402
from tests import harness  # noqa: E402
from tests.hf_models import HF_GPT2, HF_MODELS  # noqa: E402


def _case(name: str, make) -> harness.AlgorithmCase:
    return harness.AlgorithmCase(name, make)


CASES = [
    _case("gmp-erk", lambda: [SparsityScheduler(density=0.25, end=0.75), MagnitudePruning(update_every=2,
                                                                                          distribution="erk")]),
    _case("gmp-2:4", lambda: [SparsityScheduler(density=0.5, end=0.75), MagnitudePruning(update_every=2,
                                                                                         pattern="2:4")]),
    _case("gmp-global-4x8", lambda: [SparsityScheduler(density=0.25, end=0.75),
                                     MagnitudePruning(update_every=2, pattern="4x8", distribution="global")]),
    _case("SET", lambda: [SET(density=0.25, update_every=3, stop_at=1.0)]),
    _case("RigL", lambda: [RigL(density=0.25, update_every=3, stop_at=1.0)]),
    _case("SNFS", lambda: [SNFS(density=0.25, update_every=3, stop_at=1.0)]),
    _case("MEST", lambda: [MEST(density=0.25, update_every=3, stop_at=1.0)]),
    _case("Spartan", lambda: [Spartan(density=0.25, sharpness=5.0, freeze_at=3)]),
    _case("TopKAST-2:4", lambda: [TopKAST(density=0.5, backward_density=0.75, pattern="2:4", update_every=3)]),
    _case("Supermask-4x4", lambda: [Supermask(density=0.25, tile_size=4)]),
    _case("NMSparsity-2:4", lambda: [NMSparsity(n=2, m=4, at_step=2, reselect_every=2)]),
    _case("SparseGPT-2:4", lambda: [SparseGPT(nm="2:4", calibration_batches=2)]),
]
GRID = [(spec, case) for spec in HF_MODELS for case in CASES]


def _ids(grid):
    return [f"{spec.name}-{case.name}" for spec, case in grid]


@pytest.mark.parametrize(("spec", "case"), GRID, ids=_ids(GRID))
def test_fit_and_resume(spec, case, tmp_path):
    harness.check_fit_and_resume(case, tmp_path, spec=spec)
    model, callback = harness.fit(case, tmp_path / "again", spec=spec)
    head = model.get_output_embeddings().weight
    assert all(p is not head for p in callback.masks.params.values()), "the output embedding was sparsified"
    check_export(model, callback, spec, tmp_path / "export")


def check_export(model, callback, spec, path):
    """The trained model exports (2:4 or 8x8 blocks where the masks allow, verified against the trained forward), and
    the Hugging Face folder loads with ``from_pretrained`` and computes the trained logits."""
    from transformers import AutoModelForCausalLM

    batch = {"input_ids": spec.first_batch()["input_ids"]}
    pattern = "2:4" if str(callback.pattern) == "2:4" else "8x8"
    model.eval()
    manifest = export_sparse(model, path, pattern=pattern, example_input=batch)
    assert manifest.huggingface is not None and manifest.huggingface.get("reason") is None, manifest.huggingface
    loaded = AutoModelForCausalLM.from_pretrained(path / manifest.huggingface["dir"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, spec.run(model, batch),
                                   rtol=1e-5, atol=1e-5)
    for tensor in loaded.state_dict().values():
        assert not (torch.signbit(tensor) & (tensor == 0)).any(), "an exported zero is -0.0"


DDP_GRID = GRID

# GPT-2 only (Conv1D weights stored (in, out), a tied head), to keep the suite fast: the schedule ends at step 6 and
# update_every=4 does not divide it; a masked-forward algorithm bakes at fit end and must still resume after it
FINAL = [_case("TopKAST-scheduled-every-4", lambda: [SparsityScheduler(density=0.25, end=0.75),
                                                     TopKAST(update_every=4)]),
         _case("gmp-2:4-every-4", lambda: [SparsityScheduler(density=0.5, end=0.75),
                                           MagnitudePruning(update_every=4, pattern="2:4")])]
RESUME = [case for case in CASES if case.name == "Supermask-4x4"]  # scores removed at the bake, tied head


@pytest.mark.parametrize("case", FINAL, ids=[case.name for case in FINAL])
def test_final_density(case, tmp_path):
    harness.check_final_density(case, tmp_path, spec=HF_GPT2)


@pytest.mark.parametrize("case", RESUME, ids=[case.name for case in RESUME])
def test_resume_after_fit(case, tmp_path):
    harness.check_resume_after_fit(case, tmp_path, spec=HF_GPT2)


@pytest.mark.ddp
@pytest.mark.parametrize(("spec", "case"), DDP_GRID, ids=_ids(DDP_GRID))
def test_ddp(spec, case, tmp_path):
    harness.check_ddp(case, tmp_path, spec=spec)
