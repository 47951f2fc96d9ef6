"""``lightning-sparse``: the ``--sparsity`` / ``--schedule`` groups, their place in the Trainer's callbacks, and
one-line errors (exit status 2) for each kind of bad value, with the full report under ``LIGHTNING_SPARSE_DEBUG``."""

import re

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sparse.callbacks import RigL, SparsityMonitor
from lightning_sparse.cli import main
from lightning_sparse.cli_parser import short_error

TINY = ["--data", "lightning_sparse.data.DigitsDataModule", "--model.image_size=8", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def _printed(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_print_config_shows_the_groups(capsys):
    printed = _printed(capsys, "--config", "gmp", "--schedule.end", "0.5", "--sparsity.update_every", "7")
    assert "schedule:\n  class_path: lightning_sparse.callbacks.SparsityScheduler\n" in printed
    assert "sparsity:\n  class_path: lightning_sparse.callbacks.MagnitudePruning\n" in printed
    assert "  end: 0.5\n" in printed and "  update_every: 7\n" in printed


def test_the_algorithm_can_be_swapped_on_the_command_line(capsys):
    printed = _printed(capsys, "--config", "rigl", "--sparsity", "SET", "--sparsity.density", "0.2")
    assert "sparsity:\n  class_path: lightning_sparse.callbacks.SET\n  init_args:\n    density: 0.2\n" in printed


def test_a_density_override_changes_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    densities = {}
    for density in ("0.1", "0.3"):
        cli = main(["fit", "--config", "rigl", "--sparsity.density", density, *TINY])
        monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SparsityMonitor))
        densities[density] = monitor.last_report.global_density
    assert densities == pytest.approx({"0.1": 0.1, "0.3": 0.3}, abs=1e-3)
    # the groups come first (a monitor or export in trainer.callbacks runs after the masks of the step are set)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert kinds.index(RigL) < kinds.index(SparsityMonitor)
    assert (tmp_path / "runs" / "rigl" / "checkpoints" / "last.ckpt").is_file()  # a stable place for --ckpt_path
    assert any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in cli.trainer.callbacks)


def test_no_group_adds_no_callback(capsys):
    cli = main(["fit", "--config", "dense", *TINY, "--trainer.max_steps=0"])
    assert not any(isinstance(cb, RigL | SparsityMonitor) for cb in cli.trainer.callbacks)
    assert "sparsity: null\nschedule: null\n" in _printed(capsys, "--config", "dense")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity.density", "1.5"],  # range, raised by the class
         r"--sparsity: RigL: density must be in \(0, 1\] \(the fraction of weights kept\), got 1.5"),
        (["--sparsity.density", "abc"], "--sparsity.density: expected float, got 'abc'"),  # type, from the parser
        (["--sparsity", "Rigl"], r"--sparsity: 'Rigl' is not an importable class \(did you mean RigL\?\); "
                                 r"algorithms: .*MagnitudePruning.*TopKAST \(or a class path\)"),
        (["--sparsity.densty", "0.2"],
         r"--sparsity.densty: RigL has no option 'densty' \(did you mean --sparsity.density\?\)"),
        (["--sparsty", "RigL"], r"--sparsty: no such option \(did you mean --sparsity\?\)"),
        (["--trainer.callbacks+", "SparsityMonitor", "--trainer.callbacks.log_every_n_steps", "0"],
         "--trainer.callbacks: SparsityMonitor: log_every_n_steps must be >= 1, got 0"),
        (["--config", "dense", "--sparsity.density", "0.5"],
         r"--sparsity: SparsityCallback is a base class, not an algorithm; name one first, e.g. --sparsity RigL "
         r"--sparsity.density 0.5 \(algorithms: .*RigL.*\)"),
        (["--config", "gmpp"], r"--config 'gmpp' is neither a file nor a bundled recipe; recipes: \[.*'gmp'.*"),
    ],
    ids=["range", "type", "unknown-algorithm", "unknown-option", "unknown-group", "listed-callback", "no-algorithm",
         "recipe"],
)
def test_a_bad_value_is_one_line_under_the_usage(args, message, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_SPARSE_DEBUG", raising=False)
    config = [] if "--config" in args else ["--config", "rigl"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config, *args])
    assert exit_info.value.code == 2
    usage, error = capsys.readouterr().err.strip().splitlines()[-2:]
    assert usage.startswith("usage: lightning-sparse ") and "[--config CONFIG]" in usage  # the recipe: main parser's
    assert "LIGHTNING_SPARSE_DEBUG=1" in usage and ("[--sparsity ALGORITHM]" in usage or "--config" in args)
    assert error.startswith("error: ") and re.fullmatch(message, error.removeprefix("error: "))


def test_the_debug_variable_brings_back_the_full_report_and_the_trace(capsys, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPARSE_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "rigl", "--sparsity.density", "abc"])
    assert exit_info.value.code == 2
    assert "Does not validate against any of the Union subtypes" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        main(["fit", "--config", "rigl", "--sparsity.density", "0"])


def test_short_error_falls_back_to_the_innermost_reason():
    message = 'Parser key "model":\n  Does not validate against any of the types\n  Errors:\n    - it is broken\n'
    assert short_error(message) == "--model: it is broken"
    assert short_error("plain message") == "plain message"
    assert short_error("unrecognized arguments: --zzz=1", ["sparsity"]) == "--zzz: no such option"
