"""The ``lightning-sparse`` command: LightningCLI with the bundled models, datamodules and every callback.

Example:

.. code-block:: bash

    lightning-sparse fit --config configs/gmp.yaml
    lightning-sparse fit --config configs/gmp.yaml --trainer.max_epochs=2 --print_config
    lightning-sparse test --config configs/gmp.yaml --ckpt_path runs/gmp/checkpoints/last.ckpt

Models and datamodules are given by ``class_path`` (``lightning_sparse.models.SmallCNN``, ...), callbacks under
``trainer.callbacks``. ``--test_after_fit=true`` runs the test loop on the fitted model when ``fit`` ends.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_sparse.callbacks  # noqa: F401  (registers the callbacks for short class names)
import lightning_sparse.data  # noqa: F401
import lightning_sparse.models  # noqa: F401


class SparseCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule, with ``--test_after_fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run `test` when `fit` ends.")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=True)


def main(args: list[str] | None = None) -> SparseCLI:
    """Entry point of the ``lightning-sparse`` console script (and of ``python cli.py``)."""
    return SparseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
