import pickle

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback

from lightning_sparse.callbacks import MagnitudePruning, SparseExport, TopKAST
from lightning_sparse.cli import main
from lightning_sparse.export import load_sparse
from lightning_sparse.nn import SparseLinear
from tests.harness import harness_data, plain_model


def fit(root, *callbacks, max_steps=3):
    model = plain_model()
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=list(callbacks), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, harness_data())
    return model, trainer


def test_exports_and_verifies_at_fit_end(tmp_path):
    export = SparseExport(dirpath="export", pattern="4x4")
    model, _ = fit(tmp_path, MagnitudePruning(density=0.25, pattern="4x4"), export)
    manifest = export.manifest
    assert manifest.converted == ["body.0", "body.2", "head"]  # relative dirpath: under default_root_dir
    assert manifest.skipped == {"conv": "Conv1d layers are not converted (only nn.Linear and nn.Conv2d)"}
    assert manifest.layers["body.0"]["density"] == pytest.approx(0.25)
    assert manifest.verification["input_shape"] == [[16, 4, 9]]  # the first training batch
    loaded = load_sparse(tmp_path / "export", plain_model()).eval()
    assert isinstance(loaded.head, SparseLinear)
    x = next(iter(harness_data()))[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


class _BreakMask(Callback):
    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.body[0].weight.add_(1.0)  # a weight changes after masking


def test_masks_that_no_longer_hold_raise(tmp_path):
    callbacks = [MagnitudePruning(density=0.25, pattern="4x4"), _BreakMask(), SparseExport(tmp_path, pattern="4x4")]
    with pytest.raises(ValueError, match=r"masks of MagnitudePruning no longer hold for \['body.0.weight'\]"):
        fit(tmp_path, *callbacks)


@pytest.mark.parametrize("bake_at_end", [False, True])
def test_masked_forward_callbacks_are_baked_once_before_export(tmp_path, bake_at_end):
    topkast = TopKAST(density=0.5, include=["head.weight"], update_every=1000, bake_at_end=bake_at_end)
    export = SparseExport(tmp_path, pattern="dense")
    model, _ = fit(tmp_path, topkast, export, max_steps=1)
    assert topkast.baked
    assert export.manifest.layers["head"]["density"] == 0.5
    assert model.head.weight.count_nonzero() == model.head.weight.numel() // 2


def test_arguments_and_yaml(tmp_path):
    with pytest.raises(ValueError, match=r'pattern must be "RxC" blocks .* got \'blocks\''):
        SparseExport(pattern="blocks")
    with pytest.raises(TypeError, match="include must be a glob string or a list of glob strings"):
        SparseExport(include=[1])
    export = pickle.loads(pickle.dumps(SparseExport(tmp_path, pattern="2:4", include=["head"])))
    assert (export.pattern, export.include, export.verify) == ("2:4", ["head"], True)
    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = {"class_path": "lightning_sparse.callbacks.SparseExport", "init_args": {"pattern": "16x16"}}
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)  # renamed in jsonargparse 4.49
    callback = instantiate(parser.parse_object({"callback": config})).callback
    assert isinstance(callback, SparseExport) and callback.pattern == "16x16"


def test_bundled_config_parses(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/gmp_bsr_export.yaml", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "lightning_sparse.callbacks.SparseExport" in out and "lightning_sparse.callbacks.KernelBenchmark" in out
