import math

import pytest

from lightning_sparse.core.density import allocate_densities, check_density, check_distribution

MLP = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}


@pytest.mark.parametrize(
    ("density", "expected"), [(0.1, (0.0796, 0.2302, 1.0)), (0.02, (0.0154, 0.0445, 0.3674))]
)
def test_erk_matches_rigl_reference_vectors(density, expected):
    got = allocate_densities(MLP, density, "erk")
    assert tuple(round(v, 4) for v in got.values()) == expected
    total = sum(math.prod(s) for s in MLP.values())
    assert sum(got[n] * math.prod(s) for n, s in MLP.items()) == pytest.approx(density * total)


def test_er_ignores_kernel_dims_and_keeps_budget():
    shapes = {"conv": (16, 8, 3, 3), "fc": (10, 64)}
    er, erk = allocate_densities(shapes, 0.3, "er"), allocate_densities(shapes, 0.3, "erk")
    assert er != erk
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(er[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.3 * total)


def test_uniform_global_and_fixed():
    got = allocate_densities(MLP, 0.2, "uniform", fixed={"fc3": 1.0})
    assert got == {"fc1": 0.2, "fc2": 0.2, "fc3": 1.0}
    assert allocate_densities(MLP, 0.2, "global") == dict.fromkeys(MLP, 0.2)


def test_density_errors():
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        check_density(0.0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\] \(the fraction of weights kept\), got 1.5"):
        allocate_densities(MLP, 1.5)
    with pytest.raises(TypeError, match="density must be a float"):
        check_density("0.1")
    with pytest.raises(ValueError, match="distribution must be one of"):
        check_distribution("gaussian")
