"""``lightning-sparse --help`` and ``recipes`` list what there is; every callback's help text is its whole summary."""

import inspect
from pathlib import Path

import pytest
from jsonargparse._optionals import get_doc_short_description

import lightning_sparse.callbacks as callbacks
from lightning_sparse import recipes
from lightning_sparse.cli import main
from lightning_sparse.cli_parser import algorithm_names
from lightning_sparse.recipes import recipe_description, recipe_names, recipe_table


def test_help_lists_subcommands_recipes_and_algorithms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict", "recipes"))
    for name in recipe_names():
        assert f"  {name} " in out and recipe_description(name) in out
    assert ", ".join(algorithm_names()) in out and "RigL" in algorithm_names() and "SparsityCallback" not in out


def test_recipes_prints_the_table(capsys):
    assert main(["recipes"]) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines == recipe_table().splitlines() and len(lines) == len(recipe_names())
    assert lines[recipe_names().index("gmp")].split(maxsplit=1) == ["gmp", recipe_description("gmp")]


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_starts_with_a_one_line_description(name):
    description = recipe_description(name)
    assert description.endswith(".") and len(description) > 20


def test_recipe_description_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"name must be a bundled recipe, got 'nope'; recipes: \['dense'"):
        recipe_description("nope")
    (tmp_path / "bare.yaml").write_text("seed_everything: 0\n")
    monkeypatch.setattr(recipes, "RECIPES", Path(tmp_path))
    with pytest.raises(ValueError, match="recipe 'bare' must start with a '# description' line, got 'seed_everything"):
        recipe_description("bare")


CLASSES = [name for name in callbacks.__all__ if isinstance(getattr(callbacks, name), type)]


@pytest.mark.parametrize("name", CLASSES)
def test_help_text_is_the_whole_first_paragraph(name):
    cls = getattr(callbacks, name)
    paragraph = " ".join(inspect.getdoc(cls).split("\n\n")[0].split())
    shown = get_doc_short_description(cls)  # what `fit --sparsity.help NAME` / `--trainer.callbacks.help` shows
    assert shown == paragraph and not shown.endswith(":")


def test_an_algorithm_help_shows_its_summary(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--sparsity.help", "RigL"])
    out = capsys.readouterr().out
    title = get_doc_short_description(callbacks.RigL).removesuffix(".") + ":"  # the group title ends the summary
    assert f"\n{title}\n" in out and "--sparsity.drop_fraction" in out
