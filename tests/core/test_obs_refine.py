"""Least-squares refit and exact N:M re-selection: optimal weights, exact local moves, never a worse error."""

import itertools

import pytest
import torch

from lightning_sparse.core import obs_refine
from lightning_sparse.core.obs import hessian_from_inputs, obs_prune, reconstruction_error
from lightning_sparse.core.obs_refine import refit_kept, reselect_nm
from lightning_sparse.core.patterns import NM

D = torch.float64


def _layer(rows=12, cols=16, seed=0):
    """Correlated inputs with uneven scales, a float64 weight, and the inputs' Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 4, generator=g, dtype=D) @ torch.randn(4, cols, generator=g, dtype=D)
    x = (x + 0.3 * torch.randn(1024, cols, generator=g, dtype=D)) * torch.exp(torch.randn(cols, generator=g, dtype=D))
    return torch.randn(rows, cols, generator=g, dtype=D), x, hessian_from_inputs(x)


def _loss(w, new_w, h):
    delta = w - new_w
    return ((delta @ h) * delta).sum(1)


def test_refit_is_the_least_squares_optimum_of_each_row():
    w, x, h = _layer()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.4  # uneven counts per row
    new_w = refit_kept(w, h, mask)
    assert (new_w[~mask] == 0).all()
    for row in range(w.shape[0]):
        kept = mask[row]
        solution = torch.linalg.lstsq(x[:, kept], x @ w[row]).solution
        torch.testing.assert_close(new_w[row, kept], solution, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("budget", [{"nm": "2:4"}, {"density": 0.3}])
def test_refit_through_obs_prune_lowers_the_calibration_error(budget):
    w, _, h = _layer(cols=32)
    plain, mask = obs_prune(w, h, damp=0.0, **budget)
    refit, refit_mask = obs_prune(w, h, damp=0.0, refit=True, **budget)
    assert torch.equal(mask, refit_mask)
    assert reconstruction_error(w, refit, h) < reconstruction_error(w, plain, h)


def _reselect_by_brute_force(w, h, mask, nm):
    """Group by group: try every pattern of the group with the other groups fixed, keep the best refit error."""
    mask = mask.clone()
    for start in range(0, w.shape[1], nm.m):
        best, choice = None, None
        for keep in itertools.combinations(range(nm.m), nm.n):
            trial = mask.clone()
            trial[:, start : start + nm.m] = False
            trial[:, [start + j for j in keep]] = True
            loss = _loss(w, refit_kept(w, h, trial), h)
            if best is None:
                best, choice = loss, trial
            else:
                better = loss < best
                best, choice = torch.where(better, loss, best), torch.where(better[:, None], trial, choice)
        mask = choice
    return mask


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(3, 8)])
def test_reselect_makes_the_exact_best_move_for_every_group(nm):
    w, _, h = _layer(cols=16 if nm.m == 4 else 24)
    start = nm.topk_mask(w.abs(), nm.density)
    expected = _reselect_by_brute_force(w, h, start, nm)
    for lazy in (1, 3):
        assert torch.equal(reselect_nm(w, h, start, nm, lazy=lazy), expected)


def test_reselect_passes_never_raise_the_calibration_error():
    w, _, h = _layer(rows=16, cols=32, seed=3)
    mask = NM(2, 4).topk_mask(w.abs(), 0.5)
    losses = [float(_loss(w, refit_kept(w, h, mask), h).sum())]
    for _ in range(3):
        mask = reselect_nm(w, h, mask, NM(2, 4))
        assert (mask.reshape(-1, 4).sum(1) == 2).all()
        losses.append(float(_loss(w, refit_kept(w, h, mask), h).sum()))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.9 * losses[0]


def test_row_chunks_give_the_same_answer(monkeypatch):
    w, _, h = _layer(rows=10)
    mask = NM(2, 4).topk_mask(w.abs(), 0.5)
    whole_mask, whole_w = reselect_nm(w, h, mask, NM(2, 4)), refit_kept(w, h, mask)
    monkeypatch.setattr(obs_refine, "_CHUNK_ELEMENTS", 3 * 8 * 8)  # 3 rows per chunk
    assert torch.equal(reselect_nm(w, h, mask, NM(2, 4)), whole_mask)
    torch.testing.assert_close(refit_kept(w, h, mask), whole_w)

