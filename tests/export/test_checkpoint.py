import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_sparse.callbacks import MagnitudePruning
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.export import export_checkpoint, load_sparse
from lightning_sparse.export.checkpoint import main
from lightning_sparse.models import MLP
from lightning_sparse.nn import SparseLinear

MODEL = {"class_path": "lightning_sparse.models.MLP", "init_args": {"input_shape": [1, 8, 8], "hidden": [32]}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step fit of MLP(64 -> 32 -> 10) on digits, pruned to half of its 16x16 blocks."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 8, 8), hidden=(32,), scheduler=None)
    callback = MagnitudePruning(density=0.5, pattern="16x16", include=["net.1.weight"])
    trainer = pl.Trainer(
        max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", model


def test_export_from_class_path(tmp_path, checkpoint):
    ckpt, trained = checkpoint
    manifest = export_checkpoint(ckpt, "lightning_sparse.models.MLP", tmp_path, pattern="16x16")
    assert manifest.converted == ["net.1"] and manifest.verification is not None  # random batch of the input shape
    loaded = load_sparse(tmp_path, MLP(input_shape=(1, 8, 8), hidden=(32,)).eval())
    x = torch.randn(4, 1, 8, 8)
    assert isinstance(loaded.net[1], SparseLinear)
    torch.testing.assert_close(loaded(x), trained.eval()(x))


def test_export_from_config_via_main(tmp_path, checkpoint, capsys):
    config = tmp_path / "run.yaml"
    data = {"class_path": "lightning_sparse.data.DigitsDataModule", "init_args": {"batch_size": 16}}
    config.write_text(yaml.safe_dump({"model": MODEL, "data": data, "trainer": {"enable_progress_bar": False}}))
    manifest = main(["--config", str(config), "--ckpt_path", str(checkpoint[0]), "--out", str(tmp_path / "out"),
                     "--pattern", "16x16"])
    assert manifest.converted == ["net.1"] and manifest.verification["input_shape"] == [[16, 1, 8, 8]]  # real batch
    assert "exported to" in capsys.readouterr().out and (tmp_path / "out" / "manifest.json").is_file()


def test_errors(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="ckpt_path '.*missing.ckpt' is not a file"):
        export_checkpoint(tmp_path / "missing.ckpt", "lightning_sparse.models.MLP", tmp_path)
    with pytest.raises(ValueError, match="model must be a YAML config file or an importable class path, got 'nope.X'"):
        export_checkpoint(checkpoint[0], "nope.X", tmp_path)
    with pytest.raises(TypeError, match="model class path 'torch.nn.Linear' must name a LightningModule subclass"):
        export_checkpoint(checkpoint[0], "torch.nn.Linear", tmp_path)
