"""Smoke tests of the benchmark scripts' building blocks: a renamed argument or a broken variant fails here, not
in the middle of a long benchmark run. Timings are not asserted (they belong in docs/BENCHMARKS.md)."""

import importlib.util
import pathlib
import time

import pytest

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
