"""The recipes shipped with the package (the repository's ``configs/``), by name: ``--config gmp`` anywhere.

Example::

    >>> "gmp" in recipe_names()
    True
    >>> resolve_config("gmp").endswith("gmp.yaml")
    True
    >>> recipe_description("gmp")
    'Gradual magnitude pruning (Zhu & Gupta) of the SmallCNN on Fashion-MNIST to 10% density.'
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

__all__ = ["RECIPES", "recipe_description", "recipe_names", "recipe_table", "resolve_config", "with_recipes"]

RECIPES = files("lightning_sparse") / "configs"
_NAME = re.compile(r"[\w.-]+")


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package (``gmp``, ``rigl``, ...), for ``--config NAME``."""
    return sorted(entry.name.removesuffix(".yaml") for entry in RECIPES.iterdir() if entry.name.endswith(".yaml"))


def recipe_description(name: str) -> str:
    """The recipe's one-line description: the first line of its YAML, a ``#`` comment.

    Raises:
        ValueError: if ``name`` is not a bundled recipe, or its first line is not a ``# ...`` comment.
    """
    if name not in recipe_names():
        raise ValueError(f"name must be a bundled recipe, got {name!r}; recipes: {recipe_names()}")
    first = (RECIPES / f"{name}.yaml").read_text().partition("\n")[0]
    if not first.startswith("# "):
        raise ValueError(f"recipe {name!r} must start with a '# description' line, got {first!r}")
    return first.removeprefix("# ").strip()


def recipe_table() -> str:
    """Every bundled recipe and its description, one per line, aligned (``lightning-sparse recipes``)."""
    names = recipe_names()
    width = max(len(name) for name in names)
    return "\n".join(f"{name:<{width}}  {recipe_description(name)}" for name in names)


def resolve_config(value: str) -> str:
    """``value`` when it is a file (or not a bare name: inline YAML), else the path of the bundled recipe it names.

    Raises:
        ValueError: for a bare name (no folder, no YAML syntax) that is neither a file nor a bundled recipe.
    """
    if Path(value).exists() or not _NAME.fullmatch(value):
        return value
    recipe = RECIPES / (value if value.endswith(".yaml") else f"{value}.yaml")
    if not recipe.is_file():
        raise ValueError(f"--config {value!r} is neither a file nor a bundled recipe; recipes: {recipe_names()}")
    return str(recipe)


def with_recipes(args: list[str]) -> list[str]:
    """``args`` with every ``--config NAME`` / ``--config=NAME`` value passed through :func:`resolve_config`."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[index] = "--config=" + resolve_config(arg.removeprefix("--config="))
        elif arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
    return resolved
