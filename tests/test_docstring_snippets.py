"""The ``Example::`` code blocks of the package's docstrings (those that are not ``>>>`` doctests) and the README's
Python blocks are code a user can paste: they parse, import every name they use, and run up to training (``fit`` calls
build their arguments, nothing trains; blocks that read a dataset in ``setup()`` are only parsed and name-checked)."""

from __future__ import annotations

import ast
import builtins
import doctest
import importlib
import pathlib
import pkgutil
import re
import textwrap

import pytest

import lightning_sparse
from lightning_sparse.core import criteria


def _examples(docstring: str) -> list[str]:
    """The literal blocks that follow an ``Example::`` line, dedented (doctest blocks left out)."""
    lines, found = docstring.splitlines(), []
    for index, line in enumerate(lines):
        if line.strip() != "Example::":
            continue
        indent, body = len(line) - len(line.lstrip()), []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if ">>>" not in code:
            found.append(code)
    return found


def _collect() -> dict[str, str]:
    snippets = {}
    for info in pkgutil.walk_packages(lightning_sparse.__path__, "lightning_sparse."):
        if info.name.endswith("__main__"):
            continue
        for test in doctest.DocTestFinder().find(importlib.import_module(info.name)):
            for number, code in enumerate(_examples(test.docstring or "")):
                snippets[f"{test.name}[{number}]"] = code
    return snippets


def _readme_blocks() -> dict[str, str]:
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    return {f"README.md[{number}]": block for number, block in enumerate(blocks)}


SNIPPETS = {**_collect(), **_readme_blocks()}


def _unbound_names(code: str) -> set[str]:
    """Names the snippet reads that it neither imports nor assigns (builtins aside)."""
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
    return used - bound


def test_the_snippets_are_found():
    # Discovery that found nothing would make the tests below pass by checking nothing.
    expected = {"lightning_sparse.callbacks.spartan.Spartan[0]", "lightning_sparse.models.cnn.SmallCNN[0]"}
    assert expected | {"README.md[0]"} <= set(SNIPPETS)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_imports_every_name_it_uses(name):
    assert _unbound_names(SNIPPETS[name]) == set(), f"{name} uses names it does not define:\n{SNIPPETS[name]}"


class _WithoutTraining(ast.NodeTransformer):
    """``x.fit(a, b=c)`` becomes ``(a, c)``: the model, datamodule and callbacks are built, nothing trains."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "fit":
            return ast.Tuple([*node.args, *(keyword.value for keyword in node.keywords)], ast.Load())
        return node


RUNNABLE = sorted(name for name, code in SNIPPETS.items() if ".setup()" not in code)  # setup() reads a dataset


@pytest.mark.parametrize("name", RUNNABLE)
def test_snippet_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    monkeypatch.setattr(criteria, "_REGISTERED", dict(criteria._REGISTERED))  # registrations end with the test
    tree = ast.fix_missing_locations(_WithoutTraining().visit(ast.parse(SNIPPETS[name])))
    exec(compile(tree, name, "exec"), {"__name__": "snippet"})
