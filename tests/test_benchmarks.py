"""Smoke tests of the benchmark scripts' building blocks: a renamed argument or a broken variant fails here, not
in the middle of a long benchmark run. Timings are not asserted (they belong in docs/BENCHMARKS.md)."""

import importlib.util
import itertools
import pathlib
import time

import numpy as np
import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", ["dense", "RigL", "Spartan"])
def test_overhead_variants_train_and_time_every_step(model, variant):
    overhead = _load("overhead")
    timer, hooks = overhead.run_variant(overhead.VARIANTS[variant], model, steps=6, epochs=2, clock=time.perf_counter)
    assert len(timer.starts) == len(timer.ends) == 6
    assert len(timer.step_times(warmup=2)) == 4
    assert timer.amortized(warmup=2) > 0
    hook_time = hooks.per_step(timer, warmup=2)
    assert (hook_time == 0) == (variant == "dense")  # the sparsity callbacks' hooks are timed, nothing else
    assert hook_time < timer.amortized(warmup=2)


@pytest.mark.parametrize("variant", ["MagnitudePruning", "TopKAST", "Lightning ModelPruning"])
def test_overhead_times_the_hooks_of_every_other_variant(variant):
    overhead = _load("overhead")
    timer, hooks = overhead.run_variant(overhead.VARIANTS[variant], "mlp", steps=6, epochs=2, clock=time.perf_counter)
    assert len(timer.ends) == 6
    assert 0 < hooks.per_step(timer, warmup=2) < timer.amortized(warmup=2)


def test_overhead_table_prints_ratios_to_dense(capsys):
    overhead = _load("overhead")
    overhead.print_table(["dense", "RigL"], {"dense": 0.010, "RigL": 0.0105}, {"dense": 0.010, "RigL": 0.011},
                         {"dense": 0.0, "RigL": 0.0002})
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "RigL" and row[2] == "1.050" and row[4] == "1.100"
    assert row[5] == "0.200" and row[6] == "1.0200"


def test_recipe_gap_builds_the_yaml_recipe_with_the_seed_and_a_dense_baseline():
    recipe_gap = _load("recipe_gap")
    import yaml

    config = yaml.safe_load((BENCHMARKS.parent / "configs" / "rigl.yaml").read_text())
    model, data, callbacks = recipe_gap.build(config, seed=3, sparse=True)
    rigl = next(c for c in callbacks if type(c).__name__ == "RigL")
    assert (rigl.seed, rigl.distribution, rigl.optimizer_state, rigl.scale_init) == (3, "er", "keep", True)
    assert type(model).__name__ == "SmallCNN" and model.hparams.lr == 0.002
    assert type(data).__name__ == "FashionMNISTDataModule"
    assert recipe_gap.build(config, seed=3, sparse=False)[2] == []


def test_recipe_gap_table_gives_gaps_in_points(capsys):
    recipe_gap = _load("recipe_gap")
    recipe_gap.print_table([0, 1], {"dense": [0.92, 0.93], "recipe": [0.91, 0.915]})
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "| gap (points) | -1.00 | -1.50 | -1.25 |"


def test_overhead_pairs_each_round_with_its_own_dense_run():
    overhead = _load("overhead")
    assert overhead.paired_ratios([0.0110, 0.0220], [0.0100, 0.0200]) == pytest.approx([1.1, 1.1])


def _least_squares_problem(seed: int, cols: int = 16):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(200, cols, generator=generator, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=generator, dtype=torch.float64
    )
    return torch.randn(cols, generator=generator, dtype=torch.float64).numpy(), (inputs.T @ inputs / 200).numpy()


@pytest.mark.parametrize("seed", range(3))
def test_mask_search_finds_the_best_2to4_mask_of_a_small_row(seed):
    search = _load("sparsegpt_mask_search")
    w, hessian = _least_squares_problem(seed, cols=8)  # 2 groups: 36 masks, all checked by brute force
    best = min(search.best_fit(w, hessian, search.support(list(p)))[0] for p in itertools.product(range(6), repeat=2))
    start = search.magnitude_patterns(w)
    descended, error = search.coordinate_descent(w, hessian, start)
    annealed = search.anneal(w, hessian, descended, error, steps=200, rng=np.random.default_rng(seed))
    annealed_error = search.best_fit(w, hessian, search.support(annealed))[0]
    assert search.best_fit(w, hessian, search.support(start))[0] >= error >= annealed_error
    assert annealed_error == pytest.approx(best, rel=1e-9)


def test_mask_search_keeps_2_of_every_4_and_fits_them_by_least_squares():
    search = _load("sparsegpt_mask_search")
    w, hessian = _least_squares_problem(0)
    patterns, error = search.coordinate_descent(w, hessian, search.magnitude_patterns(w))
    kept = search.support(patterns)
    assert (np.bincount(kept // 4, minlength=4) == 2).all()
    fitted_error, fitted = search.best_fit(w, hessian, kept)
    gradient = hessian @ (w - fitted)
    np.testing.assert_allclose(gradient[kept], 0, atol=1e-9)  # optimal on the kept weights
    assert fitted_error == pytest.approx((w - fitted) @ hessian @ (w - fitted), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_unstructured_search_ends_where_no_single_swap_helps(seed):
    search = _load("sparsegpt_mask_search")
    w, hessian = _least_squares_problem(seed, cols=12)
    half = search.unstructured_half(w, hessian)
    kept, dropped = np.flatnonzero(half), np.flatnonzero(half == 0)
    assert len(kept) == 6
    error, fitted = search.best_fit(w, hessian, kept)
    np.testing.assert_allclose(half, fitted, atol=1e-9)
    for out, into in itertools.product(kept, dropped):
        swapped = np.sort(np.append(kept[kept != out], into))
        assert search.best_fit(w, hessian, swapped)[0] >= error * (1 - 1e-9)


def test_sparsegpt_hf_finds_the_pruned_weights_and_checks_them_for_2to4():
    hf = _load("sparsegpt_hf")
    dense = {"a": torch.ones(2, 8), "b": torch.ones(3), "c": torch.ones(2, 4)}
    pruned = {"a": torch.tensor([[1.0, 0, 1, 0] * 2, [0, 0, 0, 1] * 2]), "b": torch.ones(3), "c": torch.ones(2, 4)}
    assert hf.pruned_weights(dense, pruned) == {"a"}
    with pytest.raises(ValueError, match=r"not 2:4 along the inputs: \['c'\]"):
        hf.pruned_weights(dense, {**pruned, "c": torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])})


def test_sparsegpt_hf_acceptance_checks_each_target():
    import statistics

    hf = _load("sparsegpt_hf")
    errors = {"ours": {"a": 0.1, "b": 0.35}, "peer": {"a": 0.2, "b": 0.3}}
    ppl = {"dense": 2.0, "ours": 3.2, "magnitude": 4.0}
    rounds = {"ours": [1.5, 30.0, 1.0], "peer": [1.0, 2.0, 1.0]}
    time_ratio = statistics.median(hf.paired_ratios(rounds, "ours", "peer"))
    checks = hf.acceptance(errors, ppl, time_ratio, "ours", "peer", "magnitude")
    assert [(round(ratio, 3), target, passed) for _, ratio, target, passed in checks] == [
        (1.167, 1.0, False),  # layer b is worse than the peer's
        (0.6, 0.5, False),
        (1.5, 1.5, True),  # the median of the rounds' ratios 1.5, 15, 1
    ]
