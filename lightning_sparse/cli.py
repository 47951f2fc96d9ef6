"""The ``lightning-sparse`` command: LightningCLI with the bundled models, datamodules and every callback.

Example:

.. code-block:: bash

    lightning-sparse recipes                                  # the bundled recipes, one line each
    lightning-sparse fit --config configs/gmp.yaml
    lightning-sparse fit --config rigl --sparsity.density 0.2 --trainer.max_epochs 2   # a bundled recipe, by name
    lightning-sparse fit --config gmp --schedule.end 0.5 --print_config
    lightning-sparse test --config configs/gmp.yaml --ckpt_path runs/gmp/checkpoints/last.ckpt
    lightning-sparse fit --sparsity.help RigL                 # every option of an algorithm

``--config`` takes a YAML file, or the name of a recipe shipped with the package
(:func:`lightning_sparse.recipes.recipe_names`; the files of the repository's ``configs/``), so a pip-installed
library runs its recipes from any folder. The algorithm is its own group, ``--sparsity RigL --sparsity.density 0.2``,
and so is its schedule, ``--schedule SparsityScheduler --schedule.end 0.5``; both go first in the Trainer's callbacks,
before those of ``trainer.callbacks`` (monitor, export, checkpoints). ``--test_after_fit=true`` runs the test loop on
the fitted model when ``fit`` ends. A bad value is one line under the usage (exit status 2);
``LIGHTNING_SPARSE_DEBUG=1`` shows the parser's full report or the trace.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_sparse.callbacks  # noqa: F401  (registers the callbacks for short class names)
import lightning_sparse.data  # noqa: F401
import lightning_sparse.models  # noqa: F401
from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.monitor import readable_progress_bar
from lightning_sparse.callbacks.scheduler import SparsityScheduler
from lightning_sparse.cli_parser import (
    RawEpilogFormatter,
    SparseArgumentParser,
    algorithm_names,
    constructor_error,
    debug_active,
)
from lightning_sparse.recipes import recipe_description, recipe_names, recipe_table, with_recipes

GROUPS = ("schedule", "sparsity")  # in the Trainer's callbacks in this order, before those of trainer.callbacks
PROG = "lightning-sparse"


def overview() -> str:
    """The text under ``lightning-sparse --help``: the extra subcommand, every bundled recipe, every algorithm."""
    width = max(len(name) for name in recipe_names())
    recipes = "\n".join(f"  {name:<{width}}  {recipe_description(name)}" for name in recipe_names())
    return (f"subcommands: fit, validate, test, predict (Trainer methods); recipes (the table below)\n\n"
            f"recipes (--config NAME, from any folder):\n{recipes}\n\n"
            f"algorithms (--sparsity NAME; every option: {PROG} fit --sparsity.help NAME):\n"
            f"  {', '.join(algorithm_names())}\n\n"
            f"example: {PROG} fit --config rigl --sparsity.density 0.2 --trainer.max_epochs 2")


class SparseCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule, with the ``--sparsity`` and ``--schedule`` groups,
    ``--test_after_fit``, bundled recipes by name (``--config gmp``) and one-line errors."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], sub_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, sub_kwargs)
        self.parser.description = "Sparse training with PyTorch Lightning: every algorithm is a callback."
        self.parser.epilog = overview()
        self.parser.formatter_class = RawEpilogFormatter

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if args is not None and not isinstance(args, list | tuple):  # a dict or Namespace: no recipe names
            return super().parse_arguments(parser, args)
        try:
            args = with_recipes(sys.argv[1:] if args is None else list(args))
        except ValueError as err:
            parser.error(str(err))  # usage and the message, exit status 2, like any other bad argument
        self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run `test` when `fit` ends.")
        parser.add_subclass_arguments(SparsityCallback, "sparsity", required=False, fail_untyped=False,
                                      help=f"The sparsity algorithm, one of {', '.join(algorithm_names())}.")
        parser.add_subclass_arguments(SparsityScheduler, "schedule", required=False, fail_untyped=False,
                                      help="The density / sharpness / drop-fraction schedule (SparsityScheduler).")

    def before_instantiate_classes(self) -> None:
        """Refuses ``--sparsity.density 0.5`` without an algorithm: jsonargparse would build the base class."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        class_path = (config.get("sparsity") or {}).get("class_path") or ""
        if class_path.rpartition(".")[2] not in ("", *algorithm_names()) and class_path.startswith("lightning_sparse."):
            name = class_path.rpartition(".")[2]
            self._parser(self.subcommand).fail(
                f"--sparsity: {name} is a base class, not an algorithm; name one first, e.g. --sparsity RigL "
                f"--sparsity.density 0.5 (algorithms: {', '.join(algorithm_names())})"
            )

    def instantiate_classes(self) -> None:
        """Builds the classes; a ValueError/TypeError of a constructor (a bad value) is one line under the usage, exit
        status 2, like a parser error (the trace with ``LIGHTNING_SPARSE_DEBUG=1``)."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if debug_active():
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            self._parser(self.subcommand).fail(constructor_error(error, config))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the ``schedule`` and ``sparsity`` groups first in its callbacks (a mask callback finds
        its scheduler at setup; an export or monitor of ``trainer.callbacks`` sees the masks of the step it runs
        after), its progress bar showing ``v_num`` as the logger gives it (not ``0.000``) and ``sparsity/*`` values
        to 4 significant digits (:func:`~lightning_sparse.callbacks.monitor.readable_progress_bar`)."""
        groups = [self._get(self.config_init, key) for key in GROUPS]
        listed = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        kwargs.setdefault("callbacks", [group for group in groups if group is not None] + listed)
        trainer = super().instantiate_trainer(**kwargs)
        readable_progress_bar(trainer)
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=True)


def main(args: list[str] | None = None) -> SparseCLI | None:
    """Runs the CLI on ``args`` (default: the command line) and returns it (``python cli.py``, tests);
    ``recipes`` prints :func:`~lightning_sparse.recipes.recipe_table` and returns None."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["recipes"]:
        print(recipe_table())
        return None
    return SparseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_class=SparseArgumentParser,
        parser_kwargs={"prog": PROG},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """The ``lightning-sparse`` console script. Returns None: pip's wrapper calls ``sys.exit(console_main())``, and a
    returned object would be printed and turn a successful run into exit status 1."""
    main()


if __name__ == "__main__":
    main()
