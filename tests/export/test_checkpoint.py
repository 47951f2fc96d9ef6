import pytest
import torch
import yaml

from lightning_sparse.export import export_checkpoint, load_sparse
from lightning_sparse.export.checkpoint import main
from lightning_sparse.models import MLP
from lightning_sparse.nn import SparseLinear

MODEL = {"class_path": "lightning_sparse.models.MLP", "init_args": {"input_shape": [1, 8, 8], "hidden": [32]}}


def test_export_from_class_path(tmp_path, digits_checkpoint):
    ckpt, trained = digits_checkpoint
    manifest = export_checkpoint(ckpt, "lightning_sparse.models.MLP", tmp_path, pattern="16x16")
    assert manifest.converted == ["net.1"] and manifest.verification is not None  # random batch of the input shape
    loaded = load_sparse(tmp_path, MLP(input_shape=(1, 8, 8), hidden=(32,)).eval())
    x = torch.randn(4, 1, 8, 8)
    assert isinstance(loaded.net[1], SparseLinear)
    torch.testing.assert_close(loaded(x), trained.eval()(x))


def test_export_from_config_via_main(tmp_path, digits_checkpoint, capsys):
    config = tmp_path / "run.yaml"
    data = {"class_path": "lightning_sparse.data.DigitsDataModule", "init_args": {"batch_size": 16}}
    config.write_text(yaml.safe_dump({"model": MODEL, "data": data, "trainer": {"enable_progress_bar": False}}))
    manifest = main(["--config", str(config), "--ckpt_path", str(digits_checkpoint[0]), "--out", str(tmp_path / "out"),
                     "--pattern", "16x16"])
    assert manifest.converted == ["net.1"] and manifest.verification["input_shape"] == [[16, 1, 8, 8]]  # real batch
    assert "exported to" in capsys.readouterr().out and (tmp_path / "out" / "manifest.json").is_file()


def test_errors(tmp_path, digits_checkpoint):
    with pytest.raises(FileNotFoundError, match="ckpt_path '.*missing.ckpt' is not a file"):
        export_checkpoint(tmp_path / "missing.ckpt", "lightning_sparse.models.MLP", tmp_path)
    with pytest.raises(ValueError, match="model must be a YAML config file or an importable class path, got 'nope.X'"):
        export_checkpoint(digits_checkpoint[0], "nope.X", tmp_path)
    with pytest.raises(TypeError, match="model class path 'torch.nn.Linear' must name a LightningModule subclass"):
        export_checkpoint(digits_checkpoint[0], "torch.nn.Linear", tmp_path)


def test_hugging_face_checkpoint_gets_its_folder_unless_no_hf(tmp_path):
    pytest.importorskip("transformers")
    import lightning.pytorch as pl

    from tests.hf_models import HF_GPT2, text_batches

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(HF_GPT2.make(), text_batches(1))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    common = ["--model", "lightning_sparse.models.HFCausalLM", "--ckpt_path", str(tmp_path / "last.ckpt"), "--pattern",
              "dense", "--no-verify"]
    manifest = main([*common, "--out", str(tmp_path / "with")])
    assert manifest.huggingface["dir"] == "hf" and (tmp_path / "with" / "hf" / "config.json").is_file()
    manifest = main([*common, "--out", str(tmp_path / "without"), "--no-hf"])
    assert manifest.huggingface is None and not (tmp_path / "without" / "hf").exists()
