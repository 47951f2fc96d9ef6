"""An export that stores each layer in the blocks it was trained in (``layer_patterns``; the default of
``export_checkpoint`` when the training used several block sizes)."""

import pytest
import torch
from torch import nn

from lightning_sparse.export import export_sparse, load_sparse
from lightning_sparse.export.outcome import same_format, training_layer_patterns


def _blocky() -> nn.Sequential:
    """Layer 0 pruned in whole 8x8 blocks (not 16x16 ones), layer 2 in 16x16 blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight[:8, :8] = 0
        model[0].weight[8:16, 16:24] = 0
        model[2].weight[:16, 16:] = 0
    return model


def test_each_layer_is_stored_in_its_own_blocks(tmp_path):
    model, x = _blocky(), torch.randn(4, 32)
    manifest = export_sparse(model, tmp_path, pattern="16x16", layer_patterns={"0.weight": "8x8"}, example_input=x)
    assert manifest.layers["0"]["pattern"] == "8x8" and manifest.layers["2"]["pattern"] == "16x16"
    assert manifest.layers["0"]["stored_density"] == pytest.approx(14 / 16)  # 2 of 16 blocks empty
    assert "0.8750 (8x8)" in manifest.summary()
    loaded = load_sparse(tmp_path, _blocky())
    assert loaded[0].blocksize == (8, 8) and loaded[2].blocksize == (16, 16)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_without_its_own_blocks_the_layer_would_be_dense(tmp_path):
    manifest = export_sparse(_blocky(), tmp_path, pattern="16x16")
    assert not manifest.layers["0"]["converted"]  # every 16x16 block of layer 0 holds a non-zero


@pytest.mark.parametrize(("pattern", "layer_patterns", "error", "match"), [
    ("16x16", {"0.weight": "2:4"}, ValueError,
     r"layer_patterns\['0.weight'\] is '2:4', which the '16x16' export cannot store"),
    ("dense", {"0.weight": "8x8"}, ValueError,
     r"layer_patterns\['0.weight'\] is '8x8', which the 'dense' export cannot store"),
    ("16x16", {"0.weight": "3x"}, ValueError, r"pattern must be"),
    ("16x16", ["0.weight"], TypeError, r"layer_patterns must be a mapping of parameter name -> pattern, got list"),
])
def test_bad_layer_patterns(pattern, layer_patterns, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export_sparse(_blocky(), tmp_path, pattern=pattern, layer_patterns=layer_patterns)


def test_the_training_patterns_of_each_layer():
    checkpoint = {"callbacks": {
        "MagnitudePruning{'pattern': '64x9'}": {"masks": {"features.3.weight": 0}},
        "MagnitudePruning{'pattern': '32x32'}": {"masks": {"classifier.1.weight": 0}},
        "NMSparsity{'pattern': '2:4'}": {"masks": {"head.weight": 0}},
        "RigL{'pattern': 'unstructured'}": {"masks": {"other.weight": 0}},
    }}
    found = training_layer_patterns(checkpoint)
    assert found == {"features.3.weight": "64x9", "classifier.1.weight": "32x32", "head.weight": "2:4"}
    assert same_format("32x32", found) == {"features.3.weight": "64x9", "classifier.1.weight": "32x32"}


def test_sparse_export_stores_each_layer_in_its_training_blocks(tmp_path):
    from lightning.pytorch import Trainer

    from lightning_sparse.callbacks import MagnitudePruning, SparseExport
    from lightning_sparse.data import DigitsDataModule
    from lightning_sparse.models import MLP

    export = SparseExport(dirpath=tmp_path / "export")
    callbacks = [MagnitudePruning(density=0.25, pattern="8x8", at_step=0, include="net.1.weight"),
                 MagnitudePruning(density=0.25, pattern="4x4", at_step=0, include="net.3.weight"), export]
    trainer = Trainer(max_steps=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MLP(input_shape=(1, 8, 8), hidden=(32, 16)), DigitsDataModule(batch_size=32))
    patterns = {name: layer.get("pattern") for name, layer in export.manifest.layers.items() if layer["converted"]}
    assert patterns == {"net.1": "8x8", "net.3": "4x4"}
