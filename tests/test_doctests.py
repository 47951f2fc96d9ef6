"""Every ``>>>`` example in the package's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_sparse


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(lightning_sparse.__path__, "lightning_sparse."):
        if info.name.endswith("__main__"):
            continue
        tests = doctest.DocTestFinder().find(importlib.import_module(info.name))
        if any(test.examples for test in tests):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    # A broken discovery would pass every parametrized case below by running none.
    assert {"lightning_sparse.core.soft_topk", "lightning_sparse.masking", "lightning_sparse.nn.sparse_linear"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (doctest output above)"
