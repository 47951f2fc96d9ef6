"""The installed console scripts, run the way pip's wrappers run them (``sys.exit(entry_point())``): a successful
run exits with status 0 and prints nothing extra."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

SCRIPTS = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("lightning-sparse")}
RUN_LIKE_PIP = (
    "import sys; from importlib.metadata import entry_points; "
    "name = sys.argv.pop(1); sys.argv[0] = name; "
    "sys.exit(entry_points(group='console_scripts')[name].load()())"
)


def _run(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_LIKE_PIP, name, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_both_scripts_are_installed():
    assert set(SCRIPTS) == {"lightning-sparse", "lightning-sparse-export"}


def test_a_successful_fit_exits_with_status_0(tmp_path):
    result = _run(
        "lightning-sparse", "fit", "--model", "lightning_sparse.models.MLP", "--model.input_shape=[1, 8, 8]",
        "--model.hidden=[16]", "--data", "lightning_sparse.data.DigitsDataModule", "--trainer.fast_dev_run=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "object at 0x" not in result.stdout + result.stderr


def test_a_successful_export_exits_with_status_0(tmp_path, digits_checkpoint):
    result = _run("lightning-sparse-export", "--model", "lightning_sparse.models.MLP", "--ckpt_path",
                  str(digits_checkpoint[0]), "--out", "out", "--pattern", "16x16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported to out" in result.stdout and (tmp_path / "out" / "manifest.json").is_file()
    assert "Manifest(" not in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["lightning-sparse", "lightning-sparse-export"])
def test_a_bad_argument_exits_with_status_2(name, tmp_path):
    rest = ["fit"] if name == "lightning-sparse" else ["--ckpt_path", "x.ckpt", "--out", "out"]
    result = _run(name, *rest, "--config", "no_such_recipe", cwd=tmp_path)
    assert result.returncode == 2
    assert "'no_such_recipe' is neither a file nor a bundled recipe" in result.stderr


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_sparse", "fit", "--config", "gmp", "--print_config"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning_sparse.callbacks.MagnitudePruning" in result.stdout
