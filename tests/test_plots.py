"""The figures: accuracy against density (benchmarks/quality.py, also replayed from docs/BENCHMARKS.md)."""

import importlib.util
from pathlib import Path

import pytest

from lightning_sparse.plots import accuracy_figure, density_figure

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
TABLE = """intro

| method | density 0.1 | density 0.02 |
|---|---|---|
| dense | 0.8841 | 0.8841 |
| GMP | 0.8724 | 0.8257 |
| Spartan (sharpness 200, `configs/spartan.yaml`) † | **0.8752** | **0.8560** |

| method | density 0.5 |
|---|---|
| dense | 0.1 |
"""


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_figure_has_a_line_per_method_and_dense(tmp_path):
    accuracy = {"GMP": {0.1: 0.87, 0.02: 0.83}, "RigL": {0.02: 0.76, 0.1: 0.84}}
    figure = accuracy_figure(accuracy, 0.88, tmp_path / "img" / "plot.png")
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["GMP", "RigL", "dense (0.8800)"]
    assert list(lines[1].get_xdata()) == [0.02, 0.1] and list(lines[1].get_ydata()) == [0.76, 0.84]
    assert list(lines[2].get_ydata()) == [0.88, 0.88]
    assert (tmp_path / "img" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="accuracy must hold at least one method"):
        accuracy_figure({}, 0.9)


def test_density_figure_has_a_bar_per_layer_and_target_ticks():
    figure = density_figure([{"name": "a", "density": 0.5, "target": 0.4}, {"name": "b", "density": 1.0}])
    axes = figure.axes[0]
    assert [bar.get_width() for bar in axes.patches] == [0.5, 1.0]
    assert [tuple(p) for p in axes.collections[0].get_offsets()] == [(0.4, 0.0)]


def test_quality_reads_and_replays_its_table(tmp_path, monkeypatch, capsys):
    quality = _quality()
    dense, accuracy = quality.read_table(TABLE)
    assert dense == 0.8841
    assert accuracy == {"GMP": {0.1: 0.8724, 0.02: 0.8257},
                        "Spartan (sharpness 200, configs/spartan.yaml)": {0.1: 0.8752, 0.02: 0.8560}}
    with pytest.raises(ValueError, match="markdown holds no"):
        quality.read_table("no table")
    with pytest.raises(ValueError, match=r"the table has no dense row, got rows \['GMP'\]"):
        quality.read_table("| method | density 0.1 |\n|---|---|\n| GMP | 0.8 |\n")
    (tmp_path / "b.md").write_text(TABLE)
    argv = ["quality.py", "--replay", str(tmp_path / "b.md"), "--plot", str(tmp_path / "p.png")]
    monkeypatch.setattr("sys.argv", argv)
    quality.main()
    assert (tmp_path / "p.png").is_file() and "2 methods" in capsys.readouterr().out


def test_the_committed_plot_replays_the_benchmarks_table():
    dense, accuracy = _quality().read_table((ROOT / "docs" / "BENCHMARKS.md").read_text())
    assert dense == 0.8841 and len(accuracy) >= 10 and (ROOT / "docs" / "img" / "accuracy_vs_density.png").is_file()
