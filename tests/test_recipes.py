"""Bundled recipes by name: ``--config gmp`` resolves to the packaged YAML from any folder, for both commands."""

from pathlib import Path

import pytest

from lightning_sparse.cli import main
from lightning_sparse.export.checkpoint import main as export_main
from lightning_sparse.recipes import RECIPES, recipe_names, resolve_config, with_recipes

REPOSITORY_CONFIGS = Path(__file__).parents[1] / "configs"


def test_every_repository_recipe_is_packaged_under_its_name():
    assert REPOSITORY_CONFIGS.resolve() == Path(str(RECIPES)).resolve()  # a link, not a copy that could drift
    assert recipe_names() == sorted(path.stem for path in REPOSITORY_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("value", ["gmp", "gmp.yaml"])
def test_a_name_resolves_to_the_bundled_file(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config(value)) == Path(str(RECIPES / "gmp.yaml"))


def test_files_and_inline_yaml_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gmp").write_text("seed_everything: 3\n")  # a file of that name wins over the recipe
    assert resolve_config("gmp") == "gmp"
    assert resolve_config("configs/rigl.yaml") == "configs/rigl.yaml"
    assert resolve_config("{seed_everything: 1}") == "{seed_everything: 1}"


def test_an_unknown_name_lists_the_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--config 'gmpp' is neither a file nor a bundled recipe; recipes: \[.*'gmp'"):
        resolve_config("gmpp")


def test_both_spellings_of_the_option_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = resolve_config("rigl")
    args = with_recipes(["fit", "--config", "rigl", "--config=gmp", "--trainer.max_epochs=1"])
    assert args == ["fit", "--config", bundled, "--config=" + resolve_config("gmp"), "--trainer.max_epochs=1"]


def test_cli_runs_a_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    printed = {}
    for config in ("gmp", str(REPOSITORY_CONFIGS / "gmp.yaml")):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", config, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed[config] = capsys.readouterr().out
    first, second = printed.values()
    assert first == second and "MagnitudePruning" in first


def test_cli_rejects_an_unknown_recipe_like_any_bad_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "no_such_recipe"])
    assert exit_info.value.code == 2
    assert "'no_such_recipe' is neither a file nor a bundled recipe" in capsys.readouterr().err


def test_export_command_rejects_an_unknown_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--config", "no_such_recipe", "--ckpt_path", "x.ckpt", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "'no_such_recipe' is neither a file nor a bundled recipe" in capsys.readouterr().err
