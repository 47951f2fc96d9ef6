import sys

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_sparse.data import DigitsDataModule, PythonSourceDataModule
from lightning_sparse.models import MLP, CharGPT, SmallCNN, TinyViT


@pytest.mark.parametrize(
    ("model_cls", "data_cls", "args", "check"),
    [
        (MLP, DigitsDataModule, ["--model.hidden=[16, 8]", "--model.input_shape=[1, 8, 8]"], ("net", 6)),
        (SmallCNN, DigitsDataModule, ["--model.image_size=8", "--model.scheduler=null"], ("features", 6)),
        (TinyViT, DigitsDataModule, ["--model.image_size=8", "--model.patch_size=4", "--model.depth=3"], ("blocks", 3)),
        (CharGPT, PythonSourceDataModule, ["--model.depth=1", "--data.block_size=16"], ("blocks", 1)),
    ],
)
def test_lightning_cli_builds(monkeypatch, model_cls, data_cls, args, check):
    monkeypatch.setattr(sys, "argv", ["lightning-sparse"])
    cli = LightningCLI(model_cls, data_cls, run=False, args=args, save_config_callback=None)
    assert isinstance(cli.model, model_cls) and isinstance(cli.datamodule, data_cls)
    attr, length = check
    assert len(getattr(cli.model, attr)) == length
