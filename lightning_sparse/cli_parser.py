"""The ``lightning-sparse`` parser: a command-line mistake is one line (the option, the value, what is allowed) under a
one-line usage, exit status 2, instead of jsonargparse's nested report; ``LIGHTNING_SPARSE_DEBUG=1`` brings the full
report (and the trace of an error raised while building a class) back.

Example::

    >>> short_error('Parser key "sparsity":\\n  - Problem with given class_path '
    ...             "'lightning_sparse.callbacks.RigL':\\n      Option 'densty' is not accepted")
    "--sparsity.densty: RigL has no option 'densty' (did you mean --sparsity.density?)"
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

__all__ = [
    "DEBUG_VARIABLE",
    "RawEpilogFormatter",
    "SparseArgumentParser",
    "algorithm_names",
    "constructor_error",
    "debug_active",
    "short_error",
]

DEBUG_VARIABLE = "LIGHTNING_SPARSE_DEBUG"
_KEY = re.compile(r'Parser key "([\w.]+)"')
_CLASS = re.compile(r"class_path '([\w.]+)'")
_OPTION = re.compile(r"Option '(\w+)' is not accepted")
_IMPORT = re.compile(r"Expected a dot import path string: (\S+)|Import path (\S+) does not")
_TYPE = re.compile(r"Expected a <class '(\w+)'>")
_GIVEN = re.compile(r"Given value: (.*)")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (--[\w.-]+)", re.IGNORECASE)
_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Subclass types expect", "- a ", "tip:",
          "Expected a <class 'NoneType'>", "Not a valid subclass")


def debug_active() -> bool:
    """Whether ``LIGHTNING_SPARSE_DEBUG`` asks for the full report (set, and not ``0``, ``false``, ``no`` or empty)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def algorithm_names() -> list[str]:
    """The bundled algorithms (concrete :class:`SparsityCallback` subclasses of ``lightning_sparse.callbacks``)."""
    from lightning_sparse import callbacks
    from lightning_sparse.callbacks.base import SparsityCallback

    bases = {"SparsityCallback", "MaskedForwardCallback"}
    return [name for name in callbacks.__all__ if name not in bases and isinstance(getattr(callbacks, name), type)
            and issubclass(getattr(callbacks, name), SparsityCallback)]


def _did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def _reason(message: str) -> str:
    """The innermost line of ``message`` that states a reason (not jsonargparse's list of the types it tried)."""
    lines = [re.sub(r'^Parser key "[\w.]+":\s*', "", line.strip().removeprefix("- ").strip()) for line in
             message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(_NOISE)
               and not line.startswith("Problem with given class_path")]
    return reasons[-1] if reasons else lines[0]


def short_error(message: str, options: Iterable[str] = ()) -> str:
    """One line from a jsonargparse error ``message``: the option it is about, then the reason, with a "did you mean"
    for an unknown option name (the closest of the class's arguments, or of ``options`` at the top level) or an
    unknown algorithm (the closest bundled one)."""
    key = ".".join(_KEY.findall(message))
    cls = _CLASS.search(message)
    if unknown := _UNRECOGNIZED.search(message):
        option = unknown.group(1).partition("=")[0]
        return f"{option}: no such option{_did_you_mean(option.removeprefix('--'), options, '--')}"
    if (option := _OPTION.search(message)) and cls:
        name, class_name = option.group(1), cls.group(1).rpartition(".")[2]
        hint = _did_you_mean(name, _parameters(cls.group(1)), f"--{key}.")
        return f"--{key}.{name}: {class_name} has no option {name!r}{hint}"
    if imported := _IMPORT.search(message):
        name = imported.group(1) or imported.group(2)
        known = algorithm_names()
        hint = _did_you_mean(name, known)
        return f"--{key}: {name!r} is not an importable class{hint}; algorithms: {', '.join(known)} (or a class path)"
    given = _GIVEN.search(message)
    types = [t for t in _TYPE.findall(message) if t != "NoneType"]
    if types and given:
        return f"--{key}: expected {' or '.join(types)}, got {given.group(1).strip()!r}"
    return f"--{key}: {_reason(message)}" if key else _reason(message)


class RawEpilogFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of the description and epilog (tables, lists)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class SparseArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one line under a one-line usage (exit status 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Prints ``usage: ...`` and ``error: <one line>`` and exits with status 2; jsonargparse's full report when
        :func:`debug_active` (or when this parser raises instead of exiting: a nested parser)."""
        if not self.exit_on_error or debug_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        parser.fail(short_error(message, [action.dest for action in parser._actions]))

    def fail(self, line: str) -> NoReturn:
        """Prints the one-line usage and ``error: line`` to stderr and exits with status 2."""
        sys.stderr.write(f"{self.short_usage()}\nerror: {line}\n")
        self.exit(2)

    def short_usage(self) -> str:
        """``usage: PROG [--config CONFIG] [--sparsity ALGORITHM] ...`` and where the full help is, in one line."""
        prog = self.prog.replace(" [options]", "")
        groups = " [--sparsity ALGORITHM] [--schedule SparsityScheduler]" if self._has("sparsity") else ""
        return (f"usage: {prog} [--config CONFIG]{groups} [--KEY VALUE ...]  "
                f"({prog} --help: every option; {DEBUG_VARIABLE}=1: the full error)")

    def _has(self, dest: str) -> bool:
        return any(action.dest == dest for action in self._actions)


def _root(error: BaseException) -> BaseException:
    """The innermost ValueError/TypeError of ``error``'s chain of causes (the class's own message)."""
    found, current = error, error
    while current.__cause__ is not None or current.__context__ is not None:
        current = current.__cause__ or current.__context__
        if isinstance(current, ValueError | TypeError):
            found = current
    return found


def constructor_error(error: BaseException, config: Any) -> str:
    """One line for a ValueError/TypeError a class raised while the CLI built it: the option group (found by the
    class's name among the ``class_path`` values of the parsed ``config``), the class and its message."""
    root = _root(error)
    frames, traceback = [], root.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    owner = next((frame.f_locals["self"] for frame in frames
                  if frame.f_code.co_name == "__init__" and "self" in frame.f_locals), None)
    message = str(root).splitlines()[0] if str(root) else type(root).__name__
    if owner is None:
        return message
    name = type(owner).__name__
    keys = [key for key in ("sparsity", "schedule", "model", "data") if _names(config.get(key), name)]
    where = f"--{keys[0]}: " if keys else "--trainer.callbacks: " if _in_callbacks(config, name) else ""
    return f"{where}{name}: {message}"


def _names(value: object, name: str) -> bool:
    class_path = value.get("class_path") if hasattr(value, "get") else None
    return isinstance(class_path, str) and class_path.rpartition(".")[2] == name


def _in_callbacks(config: Any, name: str) -> bool:
    trainer = config.get("trainer")
    listed = (trainer.get("callbacks") if hasattr(trainer, "get") else None) or []
    return any(_names(entry, name) for entry in (listed if isinstance(listed, list) else [listed]))
