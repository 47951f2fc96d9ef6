import math

import pytest
import torch

from lightning_sparse.core.soft_topk import soft_topk, soft_topk_threshold

SIZES = [10, 1_000, 100_000]
SHARPNESS = [1.0, 10.0, 100.0, 1e4]
DENSITIES = [0.01, 0.1, 0.5, 0.9]
KINDS = ["normal", "heavy", "tied"]


def make_scores(kind: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "heavy":  # Cauchy-like: a few entries in the thousands
        x = torch.randn(n, generator=g, dtype=torch.float64) / torch.rand(n, generator=g, dtype=torch.float64)
    else:  # five levels: every threshold falls inside a huge group of ties
        x = torch.randint(0, 5, (n,), generator=g).double()
    return x.to(dtype)


@pytest.fixture
def one_thread():
    """Many calls on small tensors: on a busy 2-core machine, intra-op thread hand-offs then cost more than
    the work, and the file's runtime would depend on the load. Restores the thread count after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def budget_error(mask: torch.Tensor, density: float, costs: torch.Tensor | None = None) -> float:
    c = torch.ones_like(mask, dtype=torch.float64) if costs is None else costs.double()
    budget = density * c.sum()
    return ((mask.double() * c).sum() - budget).abs().item() / budget.item()


def assert_valid_mask(mask: torch.Tensor, scores: torch.Tensor) -> None:
    assert mask.shape == scores.shape and mask.dtype == scores.dtype
    assert torch.isfinite(mask).all()
    assert mask.min() >= 0 and mask.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sharpness", SHARPNESS)
@pytest.mark.usefixtures("one_thread")
def test_budget_met(kind, n, sharpness):
    scores = make_scores(kind, n)
    for density in DENSITIES:
        mask = soft_topk(scores, density, sharpness)
        assert_valid_mask(mask, scores)
        assert budget_error(mask, density) <= 1e-6, (density, budget_error(mask, density))


def test_budget_met_ten_million():
    scores = make_scores("normal", 10_000_000)
    mask = soft_topk(scores, 0.01, 1e4)
    assert_valid_mask(mask, scores)
    assert budget_error(mask, 0.01) <= 1e-6


@pytest.mark.parametrize("sharpness", SHARPNESS)
@pytest.mark.parametrize("n", [1_000, 300_000])  # direct solve and subsample-started solve
@pytest.mark.usefixtures("one_thread")
def test_budget_met_with_costs(n, sharpness):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(n, generator=g).abs()
    costs = torch.randint(1, 17, (n,), generator=g).float() ** 2  # block sizes 1x1 .. 16x16
    for density in (0.05, 0.5):
        mask = soft_topk(scores, density, sharpness, costs)
        assert_valid_mask(mask, scores)
        assert budget_error(mask, density, costs) <= 1e-6


@pytest.mark.usefixtures("one_thread")
def test_budget_met_random_configurations():
    rng = torch.Generator().manual_seed(6)
    for case in range(150):
        n = int(torch.randint(1, 20_000, (), generator=rng))
        kind = KINDS[case % 3]
        density = 10 ** (-4 * torch.rand((), generator=rng).item())
        sharpness = 10 ** (5 * torch.rand((), generator=rng).item() - 2)
        costs = torch.rand(n, generator=rng) * 100 + 0.01 if case % 4 == 0 else None
        mask = soft_topk(make_scores(kind, n, seed=case), density, sharpness, costs)
        assert torch.isfinite(mask).all()
        assert budget_error(mask, density, costs) <= 1e-6, (case, n, kind, density, sharpness)


@pytest.mark.parametrize("density", [10 / 200_010, 20 / 200_010, 0.5])
def test_far_dual_with_huge_tie(density):
    # 200k tied zeros plus 10 outliers: the root sits in a gap or inside the tie, with mu ~ -1e4 * threshold.
    scores = torch.cat([torch.full((10,), 1e6), torch.zeros(200_000)])
    mask = soft_topk(scores, density, 1e4)
    assert_valid_mask(mask, scores)
    assert budget_error(mask, density) <= 1e-6
    assert torch.all(mask[:10] > 1 - 1e-6)
    assert torch.unique(mask[10:]).numel() == 1  # tied entries get one value


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_stay_finite(scale):
    scores = make_scores("normal", 5_000) * scale
    mask = soft_topk(scores, 0.2, 1e4)
    assert_valid_mask(mask, scores)
    assert budget_error(mask, 0.2) <= 1e-6


def test_float64_budget_is_tight():
    scores = make_scores("heavy", 50_000, dtype=torch.float64)
    for sharpness in (1.0, 1e4):
        assert budget_error(soft_topk(scores, 0.1, sharpness), 0.1) <= 1e-11


def test_closed_form_with_costs():
    # m = sigmoid(beta * scores / costs + mu) with a single scalar mu.
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(200, generator=g, dtype=torch.float64)
    costs = torch.rand(200, generator=g, dtype=torch.float64) + 0.5
    beta = 3.0
    mask = soft_topk(scores, 0.3, beta, costs)
    mu = torch.logit(mask) - beta * scores / costs
    assert (mu.max() - mu.min()).item() < 1e-9
    assert budget_error(mask, 0.3, costs) <= 1e-11


def test_float32_matches_float64():
    # Same values in both dtypes; a budget met to ~2e-7 moves the threshold by ~2e-7 * k / sum(m (1 - m)) in
    # beta units, which at beta = 1e4 (few soft entries) is ~1e-3 on the mask.
    scores = make_scores("normal", 30_000)
    for sharpness, atol in ((10.0, 1e-5), (1e4, 2e-3)):
        exact = soft_topk(scores.double(), 0.1, sharpness)
        torch.testing.assert_close(soft_topk(scores, 0.1, sharpness).double(), exact, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    scores = make_scores("normal", 100_000, dtype=dtype)
    mask = soft_topk(scores, 0.1, 10.0)
    assert_valid_mask(mask, scores)
    reference = soft_topk(scores.float(), 0.1, 10.0)
    torch.testing.assert_close(mask, reference.to(dtype))  # computed in float32, rounded once
    assert budget_error(mask, 0.1) <= 1e-3


def test_hard_topk_limit():
    n, density = 1_000, 0.1
    scores = torch.randperm(n, generator=torch.Generator().manual_seed(3)).float() / n  # distinct, spacing 1e-3
    hard = torch.zeros(n)
    hard[scores.topk(int(density * n)).indices] = 1.0
    assert torch.equal(soft_topk(scores, density, 1e4).round(), hard)
    distances = [(soft_topk(scores, density, beta) - hard).abs().sum().item() for beta in (1.0, 10.0, 100.0, 1e4)]
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-3 * distances[0]


def test_ties_get_equal_values_and_all_equal_is_uniform():
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 5.0])
    mask = soft_topk(scores, 0.5, 50.0)
    assert mask[1] == mask[2] == mask[3]
    assert budget_error(mask, 0.5) <= 1e-6
    torch.testing.assert_close(soft_topk(torch.full((7, 3), -2.5), 0.3, 1e4), torch.full((7, 3), 0.3))


def test_shape_monotonicity_and_density_one():
    scores = make_scores("normal", 600).view(20, 30)
    mask = soft_topk(scores, 0.25, 5.0)
    assert mask.shape == (20, 30)
    order = scores.flatten().argsort()
    assert torch.all(mask.flatten()[order].diff() >= 0)  # higher score, higher mask
    ones = soft_topk(scores.requires_grad_(), 1.0, 5.0)
    assert torch.equal(ones, torch.ones(20, 30))


def test_deterministic_and_leaves_global_rng_alone():
    scores = make_scores("normal", 300_000)  # large enough to start from a random subsample
    state = torch.random.get_rng_state()
    first = soft_topk(scores, 0.1, 100.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(soft_topk(scores, 0.1, 100.0), first)


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 30.0])
@pytest.mark.parametrize("with_costs", [False, True])
def test_gradcheck(sharpness, with_costs):
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(9, generator=g, dtype=torch.float64).requires_grad_()
    costs = (torch.rand(9, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if with_costs else None
    inputs = (scores, costs) if with_costs else (scores,)
    assert torch.autograd.gradcheck(lambda s, c=None: soft_topk(s, 0.3, sharpness, c), inputs)


def test_gradient_keeps_budget():
    # The budget sum(c * m) = density * sum(c) holds for every input, so its gradient is 0 w.r.t. scores
    # and density w.r.t. each cost.
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(50, generator=g, dtype=torch.float64).requires_grad_()
    costs = (torch.rand(50, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    (soft_topk(scores, 0.2, 4.0, costs) * costs).sum().backward()
    torch.testing.assert_close(scores.grad, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(costs.grad, torch.full((50,), 0.2, dtype=torch.float64))


def test_single_graph_node_and_no_grad_for_constants():
    scores = make_scores("normal", 100).requires_grad_()
    mask = soft_topk(scores, 0.1, 10.0, torch.ones(100))
    assert "SoftTopK" in type(mask.grad_fn).__name__
    assert [type(f).__name__ for f, _ in mask.grad_fn.next_functions if f is not None] == ["AccumulateGrad"]
    mask[:5].sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_saturated_mask_has_finite_zero_gradient():
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0], requires_grad=True)
    soft_topk(scores, 0.5, 1e4).sum().backward()
    assert torch.isfinite(scores.grad).all()



@pytest.mark.parametrize("sharpness", [0.0, -1.0, math.nan, math.inf])
def test_rejects_bad_sharpness(sharpness):
    with pytest.raises(ValueError, match=rf"sharpness must be a finite number > 0, got {sharpness}"):
        soft_topk(torch.randn(5), 0.5, sharpness)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_rejects_bad_density(density):
    with pytest.raises(ValueError, match=rf"density must be in \(0, 1\], got {density}"):
        soft_topk(torch.randn(5), density, 1.0)


def test_rejects_costs_of_wrong_shape():
    with pytest.raises(ValueError, match=r"costs must have the shape of scores \(5,\), got \(4,\)"):
        soft_topk(torch.randn(5), 0.5, 1.0, torch.ones(4))


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf])
def test_rejects_non_positive_or_non_finite_costs(bad):
    costs = torch.ones(5)
    costs[2] = bad
    with pytest.raises(ValueError, match=r"costs must be positive and finite, got entries in \["):
        soft_topk(torch.randn(5), 0.5, 1.0, costs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_scores(bad):
    scores = torch.randn(5)
    scores[3] = bad
    with pytest.raises(ValueError, match="scores must be finite, got NaN or inf entries"):
        soft_topk(scores, 0.5, 1.0)


def test_rejects_overflowing_unit_values():
    with pytest.raises(ValueError, match=r"scores / costs must be finite, got overflow in torch.float32"):
        soft_topk(torch.full((3,), 1e30), 0.5, 1.0, torch.full((3,), 1e-30))


@pytest.mark.parametrize(("scores", "got"), [(torch.arange(5), "torch.int64"), ([0.1, 0.2], "list")])
def test_rejects_non_floating_scores(scores, got):
    with pytest.raises(TypeError, match=f"scores must be a floating-point tensor, got {got}"):
        soft_topk(scores, 0.5, 1.0)


@pytest.mark.parametrize("offset", [0.0, 1e-4, -0.3, 5.0])  # exact, near, far below, far above the root
def test_threshold_from_a_guess_meets_the_same_budget(offset):
    scores = torch.randn(300_000, generator=torch.Generator().manual_seed(4)).abs()
    cold = soft_topk_threshold(scores, 0.1, 50.0)
    warm = soft_topk_threshold(scores, 0.1, 50.0, guess=cold + offset)
    kept = torch.sigmoid(50.0 * (scores.double() - warm)).sum().item()
    assert abs(kept - 30_000) <= 1e-6 * 30_000
    assert warm == pytest.approx(cold, abs=1e-6)


@pytest.mark.parametrize("guess", [float("nan"), float("inf"), "0.1", True])
def test_bad_guess_is_rejected(guess):
    with pytest.raises(ValueError, match=r"guess must be a finite number or None, got"):
        soft_topk_threshold(torch.rand(10), 0.5, 1.0, guess=guess)


@pytest.mark.parametrize("sharpness", [1.0, 30.0, 1e4])
def test_newton_slope_matches_the_exact_sum_of_m_times_one_minus_m(sharpness):
    from lightning_sparse.core.soft_topk_solve import _Budget

    u = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    problem = _Budget(u, None, 0.1, sharpness)
    problem.residual(float(torch.quantile(u, 0.9)))
    m = problem.mask.double()
    exact = problem.mass / (sharpness * float((m * (1 - m)).sum()))
    assert problem.inverse_slope() == pytest.approx(exact, rel=1e-4)


def test_threshold_reuses_the_checked_extremes_for_its_bracket(monkeypatch):
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    threshold = soft_topk_threshold(scores, 0.2, 5.0)
    assert len(calls) == 1  # one pass for the finiteness check and the bracket together
    kept = torch.sigmoid(5.0 * (scores.double() - threshold)).sum().item()
    assert kept == pytest.approx(1000, rel=1e-6)
