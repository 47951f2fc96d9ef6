import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_sparse.export import FORMAT_VERSION, Manifest, export_sparse, load_sparse, plan_layers
from lightning_sparse.models import SmallCNN
from lightning_sparse.nn import SparseConv2d, SparseLinear


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn():
    return SmallCNN(image_size=8, width=4, scheduler=None)  # classifier: Linear(32, 128), Linear(128, 10)


def prune_blocks_(linear, block):
    n, k = linear.weight.shape
    keep = torch.rand(n // block, k // block) < 0.5
    keep[0, 0], keep[-1, -1] = True, False  # at least one kept and one dropped block
    linear.weight.data *= keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def prune_24_(linear):
    linear.weight.data.view(linear.out_features, -1, 4)[..., 1::2] = 0.0


def pruned(build, pattern, names):
    model = build()
    for name in names:
        layer = model.get_submodule(name)
        prune_24_(layer) if pattern == "2:4" else prune_blocks_(layer, int(pattern.split("x")[0]))
    return model.eval()


CASES = [
    (mlp, "16x16", ["0", "2"], (7, 32)),
    (mlp, "2:4", ["0", "2"], (7, 32)),
    (small_cnn, "32x32", ["classifier.1"], (5, 1, 8, 8)),
    (small_cnn, "2:4", ["classifier.1"], (5, 1, 8, 8)),
]


@pytest.mark.parametrize(("build", "pattern", "names", "input_shape"), CASES)
def test_round_trip_equals_the_masked_dense_model(tmp_path, build, pattern, names, input_shape):
    model = pruned(build, pattern, names)
    x = torch.randn(input_shape)
    manifest = export_sparse(model, tmp_path, pattern=pattern, example_input=x)
    assert manifest.converted == names
    assert manifest.verification["max_abs_error"] < 1e-4
    loaded = load_sparse(tmp_path, build().eval())  # other random init: everything comes from the files
    assert all(isinstance(loaded.get_submodule(name), SparseLinear) for name in names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.safetensors", "sparse.safetensors"]


def test_manifest_contents(tmp_path):
    model = pruned(small_cnn, "32x32", ["classifier.1"])
    export_sparse(model, tmp_path, pattern="32x32", example_input=torch.randn(3, 1, 8, 8))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == 1 and isinstance(data["format_version"], int)  # no Hugging Face folder
    assert "huggingface" not in data
    assert (data["format"], data["pattern"], data["blocksize"], data["n_m"]) == ("bsr", "32x32", [32, 32], None)
    assert data["dtype"] == "float32" and data["torch_version"] == str(torch.__version__)
    assert data["library_version"] and data["converted"] == ["classifier.1"]
    layer = data["layers"]["classifier.1"]
    weight = model.classifier[1].weight
    assert layer["param"] == "classifier.1.weight" and layer["shape"] == [128, 32] and layer["converted"]
    assert layer["density"] == pytest.approx((weight != 0).float().mean().item())
    assert layer["stored_density"] == pytest.approx(layer["density"])  # whole 32x32 blocks
    assert data["layers"]["features.0"]["reason"] == "matrix view (4, 9) is not divisible by the block 32x32"
    assert data["layers"]["classifier.3"]["reason"] == "shape (10, 128) is not divisible by the block 32x32"
    assert set(data["verification"]) >= {"max_abs_error", "rtol", "atol", "worst_layer"}
    stored = load_file(tmp_path / "sparse.safetensors")
    assert sorted(stored) == [f"classifier.1.weight.{c}" for c in ("col_indices", "crow_indices", "values")]
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


def test_2_4_files_and_skips(tmp_path):
    model = pruned(small_cnn, "2:4", ["classifier.1"])
    manifest = export_sparse(model, tmp_path, pattern="2:4")
    assert manifest.n_m == (2, 4) and manifest.blocksize is None and manifest.verification is None
    assert manifest.skipped["classifier.3"] == "the weight has no zeros"
    stored = sorted(load_file(tmp_path / "sparse.safetensors"))
    assert stored == ["classifier.1.weight.packed_idx", "classifier.1.weight.values"]


def test_dense_pattern_converts_nothing(tmp_path):
    model = mlp()
    manifest = export_sparse(model, tmp_path, pattern="dense", example_input=torch.randn(2, 32))
    assert manifest.converted == [] and manifest.format == "dense"
    loaded = load_sparse(tmp_path, mlp())
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_fully_dense_layer_is_skipped_unless_included(tmp_path):
    model = pruned(mlp, "16x16", ["0"])
    reason = "every 16x16 block holds a non-zero: BSR would store the whole weight"
    assert export_sparse(model, tmp_path, pattern="16x16").skipped["2"] == reason
    manifest = export_sparse(model, tmp_path, pattern="16x16", include=["2"])
    assert manifest.converted == ["2"] and manifest.layers["2"]["stored_density"] == 1.0


def test_export_leaves_the_model_unchanged(tmp_path):
    model = pruned(mlp, "16x16", ["0"]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_sparse(model, tmp_path, pattern="16x16", example_input=torch.randn(2, 32))
    assert model.training and type(model[0]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_multihead_attention_out_proj_stays_dense():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 2), "fc": nn.Linear(32, 32)})
    reasons = {p.name: p.reason for p in plan_layers(model, "16x16")}
    assert reasons["attn.out_proj"] == "nn.MultiheadAttention.out_proj stays dense (MHA reads its weight directly)"
    with pytest.raises(ValueError, match=r"cannot export layer 'attn.out_proj'.*MHA reads its weight"):
        export_sparse(model, "unused", pattern="16x16", include=["attn.out_proj"])


def test_included_layer_that_does_not_fit_raises(tmp_path):
    with pytest.raises(ValueError, match=r"cannot export layer '4' \(weight \(10, 32\)\) as pattern '16x16': shape"):
        export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16", include=["0", "4"])
    assert not (tmp_path / "manifest.json").exists()


def test_include_glob_matching_no_linear_raises(tmp_path):
    with pytest.raises(ValueError, match=r"include glob 'head\*' matches no nn.Linear"):
        export_sparse(mlp(), tmp_path, include=["head*"])


def test_weight_that_is_not_2_4_names_the_layer(tmp_path):
    model = pruned(mlp, "2:4", ["0"])
    model[2].weight.data[:, 0] = 0.0  # pruned, but not 2:4
    with pytest.raises(ValueError, match=r"cannot export layer '2' .* as pattern '2:4': .*not 2:4 sparse: row 0"):
        export_sparse(model, tmp_path, pattern="2:4")


def test_outputs_that_differ_raise_and_leave_no_manifest(tmp_path, monkeypatch):
    model = pruned(mlp, "16x16", ["0", "2"])
    export_sparse(model, tmp_path, pattern="16x16")  # a finished export, then a failing one over it
    forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: forward(self, x) + (self.out_features == 32))
    with pytest.raises(ValueError, match=r"outputs differ .* max abs error .*; worst layer '2'"):
        export_sparse(model, tmp_path, pattern="16x16", example_input=torch.randn(4, 32))
    assert not (tmp_path / "manifest.json").exists()


def test_newer_manifest_raises(tmp_path):
    export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16")
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1} is newer .*<= {FORMAT_VERSION}"):
        load_sparse(tmp_path, mlp())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": "1"}))
    with pytest.raises(ValueError, match="format_version must be an int, got '1'"):
        load_sparse(tmp_path, mlp())
    with pytest.raises(ValueError, match="manifest format must be one of"):
        Manifest.from_dict({**data, "format": "csr"})


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        load_sparse(tmp_path, mlp())
    export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16")
    (tmp_path / "sparse.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing \['sparse.safetensors'\]"):
        load_sparse(tmp_path, mlp())


def test_missing_sparse_tensor_raises(tmp_path):
    export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16")
    stored = load_file(tmp_path / "sparse.safetensors")
    save_file({k: v for k, v in stored.items() if not k.endswith("values")}, tmp_path / "sparse.safetensors")
    with pytest.raises(ValueError, match="sparse.safetensors has no tensor '0.weight.values', which layer '0' needs"):
        load_sparse(tmp_path, mlp())


def test_model_that_differs_from_the_manifest_raises(tmp_path):
    export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16")
    other = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) has weight shape \[48, 32\] but the manifest records"):
        load_sparse(tmp_path, other)
    with pytest.raises(ValueError, match="the model has no layer '4', which the export's manifest lists"):
        load_sparse(tmp_path, mlp()[:3])


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        export_sparse("model", tmp_path)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_sparse(tmp_path, None)
    with pytest.raises(ValueError, match=r'pattern must be "RxC" blocks .* got \'4:8\''):
        export_sparse(mlp(), tmp_path, pattern="4:8")
    with pytest.raises(TypeError, match="include must be a glob string or a list of glob strings, got 3"):
        export_sparse(mlp(), tmp_path, include=3)
    with pytest.raises(TypeError, match="example_input must be a Tensor, a tuple of Tensors or a dict of .*, got str"):
        export_sparse(mlp(), tmp_path, example_input="batch")
    with pytest.raises(ValueError, match="rtol must be >= 0, got -1"):
        export_sparse(mlp(), tmp_path, rtol=-1)
    assert not any(tmp_path.iterdir())


def conv_cnn():
    return SmallCNN(image_size=8, width=16, scheduler=None)  # features.3: Conv2d(16, 32, 3), matrix view (32, 144)


def pruned_conv_cnn(channels=(0, 5, 9, 12)):
    model = conv_cnn()
    keep = torch.zeros(16, dtype=torch.bool)
    keep[list(channels)] = True
    model.features[3].weight.data *= keep[None, :, None, None]
    prune_blocks_(model.classifier[1], 16)
    return model.eval()


def test_small_cnn_round_trip_with_a_sparse_conv(tmp_path):
    model = pruned_conv_cnn()
    x = torch.randn(5, 1, 8, 8)
    manifest = export_sparse(model, tmp_path, pattern="16x16", example_input=x)
    assert manifest.converted == ["features.3", "classifier.1"] and manifest.format_version == 1
    assert manifest.skipped["features.0"] == "matrix view (16, 9) is not divisible by the block 16x16"
    layer = manifest.layers["features.3"]
    assert layer["type"] == "Conv2d" and layer["shape"] == [32, 16, 3, 3] and layer["density"] == pytest.approx(0.25)
    assert layer["stored_density"] >= layer["density"]  # whole 16x16 blocks of the (32, 144) matrix view
    assert load_file(tmp_path / "sparse.safetensors")["features.3.weight.values"].shape[1:] == (16, 16)
    loaded = load_sparse(tmp_path, conv_cnn().eval())  # other random init: everything comes from the files
    assert isinstance(loaded.features[3], SparseConv2d) and isinstance(loaded.classifier[1], SparseLinear)
    assert loaded.features[3].used_channels.tolist() == [0, 5, 9, 12]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_conv_reading_most_channels_is_skipped_unless_included(tmp_path):
    model = pruned_conv_cnn(channels=range(12))
    reason = (
        "reads 12 of 16 input channels: SparseConv2d skips unused input channels and is faster than dense only up "
        "to 50% of them"
    )
    assert export_sparse(model, tmp_path, pattern="16x16").skipped["features.3"] == reason
    manifest = export_sparse(
        model, tmp_path, pattern="16x16", include=["features.3"], example_input=torch.randn(2, 1, 8, 8)
    )
    assert manifest.converted == ["features.3"]
    assert isinstance(load_sparse(tmp_path, conv_cnn()).features[3], SparseConv2d)


def test_included_conv_that_does_not_fit_raises(tmp_path):
    model = pruned_conv_cnn()
    with pytest.raises(ValueError, match=r"layer 'features.0' \(weight \(16, 1, 3, 3\)\) as pattern '16x16': matrix"):
        export_sparse(model, tmp_path, pattern="16x16", include=["features.*"])
    with pytest.raises(ValueError, match=r"layer 'features.3' .* as pattern '2:4': 2:4 is not a Conv2d format"):
        export_sparse(model, tmp_path, pattern="2:4", include=["features.3"])
    reasons = {plan.name: plan.reason for plan in plan_layers(model, "2:4")}
    assert reasons["features.3"] == "2:4 is not a Conv2d format (SparseConv2d stores BSR blocks)"


class PlainWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(64, 32))


def test_converted_layer_of_another_kind_raises(tmp_path):
    export_sparse(pruned(mlp, "16x16", ["0"]), tmp_path, pattern="16x16")
    with pytest.raises(ValueError, match="layer '0' is converted in the export but is a PlainWeight, not Linear, Hugg"):
        load_sparse(tmp_path, nn.Sequential(PlainWeight(), *mlp()[1:]))
    export_sparse(pruned_conv_cnn(), tmp_path, pattern="16x16")
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format": "2:4"}))
    with pytest.raises(ValueError, match="layer 'features.3' is a Conv2d, which '2:4' exports never convert"):
        load_sparse(tmp_path, conv_cnn())


@pytest.mark.parametrize("pattern", ["16x16", "2:4"])
def test_files_hold_positive_zeros_only(tmp_path, pattern):
    model = mlp()
    mask = torch.ones(64, 32)
    mask[:, 16:] = 0.0  # whole 16x16 blocks, and 2 of every 4 inputs
    mask[:, 1:16:2] = 0.0
    with torch.no_grad():
        model[0].weight.copy_(-model[0].weight.abs() * mask)  # negative weights times 0: -0.0
        model[0].bias[:3] = -0.0
    signed = torch.signbit(model[0].weight) & (model[0].weight == 0)
    assert signed.any()
    manifest = export_sparse(model, tmp_path, pattern=pattern, example_input=torch.randn(3, 32))
    assert manifest.converted[0] == "0"
    for name in ("model.safetensors", "sparse.safetensors"):
        for key, t in load_file(tmp_path / name).items():
            assert not (t.is_floating_point() and (torch.signbit(t) & (t == 0)).any()), (name, key)
    assert torch.equal(torch.signbit(model[0].weight) & (model[0].weight == 0), signed)  # the live model unchanged


def test_tied_weights_are_written_once_and_load_back(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 10))
    model[4].weight = model[0].weight
    prune_blocks_(model[1], 16)
    manifest = export_sparse(model, tmp_path, pattern="16x16", example_input=torch.arange(6)[None])
    assert manifest.converted == ["1"]
    assert manifest.skipped["4"].startswith("its weight is tied to '0.weight'")
    assert "4.weight" not in load_file(tmp_path / "model.safetensors")
    fresh = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 10))
    fresh[4].weight = fresh[0].weight
    loaded = load_sparse(tmp_path, fresh)
    assert isinstance(loaded[1], SparseLinear) and loaded[4].weight is loaded[0].weight
    x = torch.arange(6)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
