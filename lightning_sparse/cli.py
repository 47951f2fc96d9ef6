"""The ``lightning-sparse`` command: LightningCLI with the bundled models, datamodules and every callback.

Example:

.. code-block:: bash

    lightning-sparse fit --config configs/gmp.yaml
    lightning-sparse fit --config gmp --trainer.max_epochs=2 --print_config   # a bundled recipe, by name
    lightning-sparse test --config configs/gmp.yaml --ckpt_path runs/gmp/checkpoints/last.ckpt

``--config`` takes a YAML file, or the name of a recipe shipped with the package
(:func:`lightning_sparse.recipes.recipe_names`; the files of the repository's ``configs/``), so a pip-installed
library runs its recipes from any folder. Models and datamodules are given by ``class_path``
(``lightning_sparse.models.SmallCNN``, ...), callbacks under ``trainer.callbacks``. ``--test_after_fit=true`` runs
the test loop on the fitted model when ``fit`` ends.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_sparse.callbacks  # noqa: F401  (registers the callbacks for short class names)
import lightning_sparse.data  # noqa: F401
import lightning_sparse.models  # noqa: F401
from lightning_sparse.callbacks.monitor import readable_progress_bar
from lightning_sparse.recipes import with_recipes


class SparseCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule, with ``--test_after_fit`` and bundled recipes
    by name (``--config gmp``)."""

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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, its progress bar showing ``v_num`` as the logger gives it (not ``0.000``) and ``sparsity/*``
        values to 4 significant digits (:func:`~lightning_sparse.callbacks.monitor.readable_progress_bar`)."""
        trainer = super().instantiate_trainer(**kwargs)
        readable_progress_bar(trainer)
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=True)


def main(args: list[str] | None = None) -> SparseCLI:
    """Runs the CLI on ``args`` (default: the command line) and returns it (``python cli.py``, tests)."""
    return SparseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> None:
    """The ``lightning-sparse`` console script. Returns None: pip's wrapper calls ``sys.exit(console_main())``, and a
    returned object would be printed and turn a successful run into exit status 1."""
    main()


if __name__ == "__main__":
    main()
