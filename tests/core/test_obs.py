"""OBS pruning (SparseGPT's per-layer solver): exact budgets, written-back updates, lower error than magnitude."""

import itertools

import pytest
import torch

from lightning_sparse.core.masks import topk_mask
from lightning_sparse.core.obs import hessian_from_inputs, inverse_hessian_factor, obs_prune, reconstruction_error
from lightning_sparse.core.patterns import NM


def _layer(rows=32, cols=64, seed=0):
    """A weight and inputs shaped like real activations: a few strong directions plus noise, uneven feature scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, cols, generator=g)
    x = x + 0.3 * torch.randn(2048, cols, generator=g)
    x = x * torch.exp(0.5 * torch.randn(cols, generator=g))
    return torch.randn(rows, cols, generator=g), x


@pytest.mark.parametrize("budget", [{"density": 0.5}, {"nm": "2:4"}])
def test_lower_error_than_magnitude_at_the_same_budget(budget):
    w, x = _layer()
    hessian = hessian_from_inputs(x)
    new_w, mask = obs_prune(w, hessian, **budget, block_size=16)
    magnitude_mask = NM(2, 4).topk_mask(w.abs(), 0.5) if "nm" in budget else topk_mask(w.abs(), w.numel() // 2)
    assert int(mask.sum()) == int(magnitude_mask.sum())
    assert reconstruction_error(w, new_w, hessian) < 0.5 * reconstruction_error(w, w * magnitude_mask, hessian)


@pytest.mark.parametrize(("density", "block_size"), [(0.5, 128), (0.3, 48), (0.77, 7), (1 / 64 / 32, 16)])
def test_unstructured_budget_is_exact(density, block_size):
    w, x = _layer(rows=32, cols=100)
    new_w, mask = obs_prune(w, hessian_from_inputs(x), density=density, block_size=block_size)
    assert int(mask.sum()) == round(density * w.numel())
    assert (new_w[~mask] == 0).all()


@pytest.mark.parametrize("selection", ["joint", "independent"])
@pytest.mark.parametrize(("nm", "block_size"), [("2:4", 128), ("1:4", 10), ("3:8", 8), ("2:4", 1)])
def test_nm_keeps_exactly_n_of_every_m(nm, block_size, selection):
    n, m = map(int, nm.split(":"))
    w, x = _layer(rows=16, cols=64)
    new_w, mask = obs_prune(w, hessian_from_inputs(x), nm=nm, block_size=block_size, nm_selection=selection)
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert (new_w[~mask] == 0).all()


@pytest.mark.parametrize(("nm", "seed"), [("2:4", 0), ("2:4", 1), ("1:4", 2), ("2:8", 3)])
def test_joint_selection_is_no_worse_than_independent(nm, seed):
    w, x = _layer(seed=seed)
    hessian = hessian_from_inputs(x)
    joint, _ = obs_prune(w, hessian, nm=nm, block_size=16)
    independent, _ = obs_prune(w, hessian, nm=nm, block_size=16, nm_selection="independent")
    assert reconstruction_error(w, joint, hessian) <= reconstruction_error(w, independent, hessian)


def test_joint_selection_of_one_group_is_the_exact_optimum():
    """With one group, the joint choice and update must equal the best pattern with least-squares kept weights."""
    w, x = _layer(rows=64, cols=4, seed=5)
    w, x = w.double(), x.double()
    new_w, mask = obs_prune(w, hessian_from_inputs(x), nm="2:4", damp=0.0)
    best = torch.full((64,), float("inf"), dtype=torch.float64)
    for keep in itertools.combinations(range(4), 2):
        fit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution  # (2, rows)
        best = torch.minimum(best, torch.linalg.norm(x @ w.T - x[:, keep] @ fit, dim=0))
    torch.testing.assert_close(torch.linalg.norm(x @ (w - new_w).T, dim=0), best, rtol=1e-6, atol=1e-9)
    _, independent = obs_prune(w, hessian_from_inputs(x), nm="2:4", damp=0.0, nm_selection="independent")
    assert not torch.equal(mask, independent)  # the per-weight saliency picks a worse pair on some rows


@pytest.mark.parametrize("reselect", [0, 2])
def test_refit_and_reselect_lower_the_error_and_keep_the_pattern(reselect):
    w, x = _layer()
    hessian = hessian_from_inputs(x)
    plain, _ = obs_prune(w, hessian, nm="2:4", block_size=16)
    new_w, mask = obs_prune(w, hessian, nm="2:4", block_size=16, refit=True, reselect=reselect)
    assert (mask.reshape(-1, 4).sum(1) == 2).all() and (new_w[~mask] == 0).all() and new_w.dtype == w.dtype
    assert reconstruction_error(w, new_w, hessian) < reconstruction_error(w, plain, hessian)


def test_kept_weights_are_updated_and_shape_and_dtype_kept():
    w, x = _layer(rows=8, cols=12)
    conv_w = w.reshape(8, 3, 4).half()
    new_w, mask = obs_prune(conv_w, hessian_from_inputs(x[:, :12]), density=0.5)
    assert new_w.shape == mask.shape == conv_w.shape and new_w.dtype == torch.float16
    assert (new_w[mask] != conv_w[mask]).float().mean() > 0.9


def test_diagonal_hessian_is_magnitude_times_input_scale_without_updates():
    w = torch.randn(6, 8)
    scales = torch.arange(1.0, 9.0)
    new_w, mask = obs_prune(w, torch.diag(scales), density=0.5, damp=0.0)
    assert torch.equal(mask, topk_mask(w.square() * scales, 24))
    torch.testing.assert_close(new_w, w * mask)


def test_dead_inputs_are_zeroed():
    w, x = _layer(rows=8, cols=16)
    x[:, 3] = 0
    new_w, mask = obs_prune(w, hessian_from_inputs(x), nm="2:4")
    assert (new_w[:, 3] == 0).all() and (mask.reshape(-1, 4).sum(1) == 2).all()


def test_reconstruction_error_matches_the_outputs():
    w, x = _layer(rows=8, cols=16)
    w2 = w * (torch.rand_like(w) > 0.5)
    direct = torch.linalg.norm((w - w2) @ x.T) / torch.linalg.norm(w @ x.T)
    assert reconstruction_error(w, w2, hessian_from_inputs(x)) == pytest.approx(float(direct), rel=1e-6)


def test_singular_hessian_retries_with_more_damping():
    x = torch.randn(4, 16)  # rank 4 < 16
    with pytest.warns(UserWarning, match="Hessian of fc needed damp=0.001"):
        factor = inverse_hessian_factor(hessian_from_inputs(x), damp=0.0, name="fc")
    assert torch.isfinite(factor).all()


def test_not_positive_definite_raises_naming_the_layer():
    with pytest.raises(ValueError, match="Hessian of fc2 is not positive definite"):
        obs_prune(torch.randn(4, 8), -torch.eye(8), density=0.5, name="fc2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of density"),
        ({"density": 0.5, "nm": "2:4"}, "exactly one of density"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"nm": "4x4"}, "nm must be an 'N:M'"),
        ({"nm": "4:4"}, "0 < N < M"),
        ({"nm": "2:3"}, r"input dimension of fc \(shape \(4, 8\)"),
        ({"density": 0.5, "block_size": 0}, "block_size must be >= 1"),
        ({"density": 0.5, "damp": -1.0}, "damp >= 0"),
        ({"nm": "2:4", "nm_selection": "greedy"}, "nm_selection must be 'joint' or 'independent', got 'greedy'"),
        ({"nm": "2:4", "refit": True, "reselect": -1}, "reselect must be >= 0, got -1"),
        ({"density": 0.5, "refit": True, "reselect": 1}, "reselect=1 re-selects N:M masks and needs nm="),
        ({"nm": "2:4", "reselect": 2}, "reselect=2 re-selects masks for least-squares weights and needs refit=True"),
        ({"nm": "8:16"}, "nm='8:16' has 12870 patterns per group, more than the 1024"),
        ({"nm": "8:16", "nm_selection": "independent", "refit": True, "reselect": 1}, "nm='8:16' has 12870"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        obs_prune(torch.randn(4, 8), torch.eye(8), name="fc", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"refit": "yes"}, "refit must be a bool, got str: 'yes'"),
        ({"refit": True, "reselect": 1.5}, "reselect must be an int, got float: 1.5"),
    ],
)
def test_bad_option_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        obs_prune(torch.randn(4, 8), torch.eye(8), nm="2:4", **kwargs)


def test_bad_hessians():
    with pytest.raises(ValueError, match=r"Hessian of fc must be \(8, 8\)"):
        obs_prune(torch.randn(4, 8), torch.eye(6), density=0.5, name="fc")
    with pytest.raises(ValueError, match="Hessian of fc holds NaN"):
        obs_prune(torch.randn(4, 8), torch.full((8, 8), float("nan")), density=0.5, name="fc")

