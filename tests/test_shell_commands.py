"""Every shell command of the README's ``bash`` blocks and of the package's ``.. code-block:: bash`` docstrings runs as
written, block by block in one folder (a later command uses the checkpoint an earlier one wrote), with tiny
overrides for length appended to ``fit``/``validate``/``test``: so no example can drift from the code again."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import shlex
import textwrap
from pathlib import Path

import pytest

import lightning_sparse
from lightning_sparse import cli
from lightning_sparse.export import checkpoint

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
PROGRAMS = {  # how each program of the examples is reached in this process (tests/test_console_scripts.py runs the
    "lightning-sparse": cli.main,  # installed console scripts themselves)
    "python cli.py": cli.main,
    "python -m lightning_sparse": cli.main,
    "lightning-sparse-export": checkpoint.main,
    "python -m lightning_sparse.export": checkpoint.main,
}
NOT_RUN = {  # commands that cannot run inside the test suite, and why
    "bash scripts/install.sh": "installs system packages and torch",
    "python -m pytest -q": "is the test suite itself",
    "python -m lightning_sparse.consolidate": "needs a folder written by two FSDP2 ranks (tests/callbacks/"
                                              "test_fsdp2_checkpoint.py consolidates one)",
}


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``a && b`` as two commands."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                command.append(word)
            elif command:
                found.append(shlex.join(command))
                command = []
    return found


def _readme_blocks() -> dict[str, str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return {f"README.md[{number}]": block for number, block in enumerate(blocks)}


def _docstring_blocks() -> dict[str, str]:
    blocks = {}
    for info in pkgutil.walk_packages(lightning_sparse.__path__, "lightning_sparse."):
        if info.name.endswith("__main__"):
            continue
        for test in doctest.DocTestFinder().find(importlib.import_module(info.name)):
            found = re.findall(r"\.\. code-block:: bash\n\n((?:    .*\n|\n)+)", (test.docstring or "") + "\n")
            blocks.update({f"{test.name}[{n}]": textwrap.dedent(block) for n, block in enumerate(found)})
    return blocks


BLOCKS = {**_readme_blocks(), **_docstring_blocks()}


def _program(command: str) -> tuple[str, list[str]]:
    for program in sorted(PROGRAMS, key=len, reverse=True):
        if command == program or command.startswith(program + " "):
            return program, shlex.split(command)[len(program.split()):]
    raise AssertionError(f"no way to run {command!r}: add its program to PROGRAMS or the command to NOT_RUN")


def test_the_blocks_are_found():
    names = set(BLOCKS)
    assert {"README.md[0]", "lightning_sparse.cli[0]", "lightning_sparse.export.checkpoint[0]"} <= names
    assert "lightning-sparse fit --config configs/gmp.yaml" in commands(BLOCKS["README.md[0]"])
    assert commands("a \\\n  b # c\nd && e") == ["a b", "d", "e"]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="the recipes read Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_runs_as_written(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the commands are written for a checkout's root
    (tmp_path / "cli.py").symlink_to(ROOT / "cli.py")
    for command in commands(BLOCKS[name]):
        if any(command.startswith(skipped) for skipped in NOT_RUN):
            continue
        program, args = _program(command)
        asks_help = any(arg == "--help" or arg.endswith(".help") for arg in args)
        tiny = TINY if args[:1] in (["fit"], ["validate"], ["test"]) and not asks_help else []
        try:
            PROGRAMS[program]([*args, *tiny])
        except SystemExit as exit_info:
            assert exit_info.code in (0, None), f"{command!r} exited with {exit_info.code}: {capsys.readouterr().err}"
