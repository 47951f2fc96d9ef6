import pickle
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback

from lightning_sparse.callbacks import MagnitudePruning, SparseExport, TopKAST
from lightning_sparse.callbacks.export import first_batch_input
from lightning_sparse.cli import main
from lightning_sparse.export import load_sparse
from lightning_sparse.nn import SparseLinear
from tests.harness import harness_data, plain_model

CONV1D_REASON = "Conv1d layers are not converted (only nn.Linear, Hugging Face Conv1D and nn.Conv2d)"


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
    assert manifest.skipped == {"conv": CONV1D_REASON}
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


def test_arguments_hf():
    with pytest.raises(TypeError, match="hf must be True, False or None, got 1"):
        SparseExport(hf=1)
    assert pickle.loads(pickle.dumps(SparseExport(hf=False))).hf is False


def test_hugging_face_model_exports_its_folder_verified_on_a_dict_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import HF_GPT2, text_batches

    model = HF_GPT2.make()
    export = SparseExport(dirpath="export", pattern="2:4")
    trainer = pl.Trainer(
        max_steps=2, callbacks=[MagnitudePruning(density=0.5, pattern="2:4"), export], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, text_batches(2))
    manifest = export.manifest
    assert manifest.verification["input_shape"] == {"input_ids": [4, 16], "labels": [4, 16]}  # model(**batch)
    assert manifest.huggingface["dir"] == "hf" and manifest.huggingface["verification"]["max_abs_error"] == 0.0
    assert "model.transformer.h.0.attn.c_attn" in manifest.converted and "model.lm_head" in manifest.skipped
    ids = next(iter(text_batches(1)))["input_ids"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(ids), rtol=0, atol=1e-6)


class _Texts(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.randn(4, 9), "text": "words"}


def test_first_batch_input_of_dict_batches():
    loader = torch.utils.data.DataLoader(_Texts(), batch_size=2)
    assert first_batch_input(SimpleNamespace(train_dataloader=loader)) is None  # "text" is no model input
    rows = [{"input_ids": torch.arange(3)}] * 2
    batch = first_batch_input(SimpleNamespace(train_dataloader=torch.utils.data.DataLoader(rows, batch_size=2)))
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (2, 3)
