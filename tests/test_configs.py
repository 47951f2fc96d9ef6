"""Every recipe in configs/ parses with the CLI and names classes that exist."""

from pathlib import Path

import pytest

from lightning_sparse.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {"dense.yaml", "gmp.yaml", "gmp_2to4.yaml", "rigl.yaml", "spartan.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_recipe_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_sparse.models." in printed and "class_path: lightning_sparse.data." in printed


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS[0]), "--trainer.no_such_option=1"])
    assert exit_info.value.code != 0
