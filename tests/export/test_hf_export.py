"""Exports of tiny Hugging Face models: GPT-2 (``Conv1D`` stored ``(in, out)``, ``lm_head`` tied to ``wte``) and Llama.

The sparse files hold each weight's ``(out, in)`` view, ``load_sparse`` rebuilds ``Conv1D`` as ``SparseLinear``, the
``hf/`` folder is a ``save_pretrained`` checkpoint that ``from_pretrained`` loads, and no file holds a ``-0.0``.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_sparse.export import Manifest, export_sparse, load_sparse, plan_layers  # noqa: E402
from lightning_sparse.export import hf as hf_export  # noqa: E402
from lightning_sparse.layers import layer_weights, parameter_aliases  # noqa: E402
from lightning_sparse.nn import SparseLinear  # noqa: E402
from tests.hf_models import HF_GPT2, HF_LLAMA, text_batches  # noqa: E402

TIED = "its weight is tied to 'model.transformer.wte.weight': tied weights stay dense (converting would untie them)"


def prune_(model, pattern):
    """Magnitude-prunes every weight but the embeddings and heads on its ``(out, in)`` view, as ``w * mask`` (which
    leaves ``-0.0`` for negative pruned weights)."""
    aliases = parameter_aliases(model)
    for fqn, layer in layer_weights(model).items():
        if len(aliases[fqn]) > 1 or "lm_head" in fqn:
            continue
        weight = model.get_parameter(fqn)
        view = layer.kind.as_matrix(weight.detach())
        n, k = view.shape
        if pattern == "2:4":
            top = view.abs().reshape(n, -1, 4).topk(2, dim=-1).indices
            mask = torch.zeros(n, k // 4, 4).scatter_(-1, top, 1.0).reshape(n, k)
        else:
            b = int(pattern.split("x")[0])
            norms = view.abs().reshape(n // b, b, k // b, b).sum((1, 3)).flatten()
            keep = torch.zeros_like(norms).scatter_(0, norms.topk(norms.numel() // 2).indices, 1.0)
            mask = keep.reshape(n // b, k // b).repeat_interleave(b, 0).repeat_interleave(b, 1)
        weight.data.copy_(layer.kind.from_matrix(view * mask, weight.shape))
    return model


def negative_zeros(tensors):
    return [name for name, t in tensors.items() if t.is_floating_point() and (torch.signbit(t) & (t == 0)).any()]


def input_ids():
    return next(iter(text_batches(1)))["input_ids"]


def perturbed(spec):
    model = spec.make().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))  # whatever loads must come from the files
    return model


@pytest.mark.parametrize("pattern", ["2:4", "8x8"])
@pytest.mark.parametrize("spec", [HF_GPT2, HF_LLAMA], ids=lambda s: s.name)
def test_hf_folder_and_sparse_files_reproduce_the_model(tmp_path, spec, pattern):
    model = prune_(spec.make().eval(), pattern)
    assert any(negative_zeros(dict(model.named_parameters())))  # the live model holds -0.0: the check can fail
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids)
    manifest = export_sparse(model, tmp_path, pattern=pattern, example_input={"input_ids": ids})
    assert manifest.verification["input_shape"] == {"input_ids": [4, 16]}
    hf = manifest.huggingface
    assert (hf["dir"], hf["module"], hf["class"], hf["reason"]) == ("hf", "model", type(model.model).__name__, None)
    assert hf["verification"]["max_abs_error"] == 0.0
    assert manifest.format_version == 2 and json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 2

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    files = [*(tmp_path / "hf").glob("*.safetensors"), tmp_path / "sparse.safetensors", tmp_path / "model.safetensors"]
    for path in files:
        assert negative_zeros(load_file(path)) == [], path
    assert any(negative_zeros(dict(model.named_parameters())))  # the export did not change the live model

    loaded = load_sparse(tmp_path, perturbed(spec))
    for name in manifest.converted:
        assert isinstance(loaded.get_submodule(name), SparseLinear), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_is_planned_on_its_out_in_view(tmp_path):
    model = prune_(HF_GPT2.make().eval(), "2:4")
    manifest = export_sparse(model, tmp_path, pattern="2:4")
    fc = manifest.layers["model.transformer.h.0.mlp.c_fc"]
    assert (fc["type"], fc["shape"], fc["matrix_shape"], fc["converted"]) == ("Conv1D", [16, 64], [64, 16], True)
    assert manifest.converted == [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert manifest.skipped["model.lm_head"] == TIED
    stored = load_file(tmp_path / "sparse.safetensors")
    assert stored["model.transformer.h.0.mlp.c_fc.weight.values"].shape == (64, 8)  # (out, in / 2)
    hf_weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert hf_weights["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)  # HF orientation on disk: (in, out)
    assert "lm_head.weight" not in hf_weights  # tied: written once, as wte
    assert torch.equal(hf_weights["transformer.h.0.mlp.c_fc.weight"], model.model.transformer.h[0].mlp.c_fc.weight)


def test_tied_lm_head_named_by_include_raises(tmp_path):
    with pytest.raises(ValueError, match=r"cannot export layer 'model.lm_head' .*: its weight is tied to 'model.tra"):
        export_sparse(prune_(HF_GPT2.make(), "2:4"), tmp_path, pattern="2:4", include=["model.lm_head"])


def test_conv1d_along_its_outputs_is_not_2_4(tmp_path):
    model = prune_(HF_GPT2.make().eval(), "2:4")
    c_fc = model.model.transformer.h[0].mlp.c_fc
    with torch.no_grad():  # 2:4 groups along the stored last dim: the outputs, not the inputs
        c_fc.weight.copy_(torch.randn(16, 64) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(16))
    with pytest.raises(ValueError, match=r"layer 'model.transformer.h.0.mlp.c_fc' .*: Conv1D weight stored as "
                                         r"\(16, 64\), \(out, in\) view \(64, 16\): .*not 2:4 sparse: row 0"):
        export_sparse(model, tmp_path, pattern="2:4")


def test_conv1d_that_does_not_fit_is_skipped_or_raises(tmp_path):
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(8, 6))  # nf=8 outputs, nx=6 inputs: stored (6, 8)
    model[0].weight.data[:2] = 0.0  # inputs 0 and 1: the first two columns of the (out, in) view
    reason = "Conv1D weight stored as (6, 8), (out, in) view (8, 6): in_features 6 is not divisible by 4"
    assert [(p.name, p.convert, p.reason) for p in plan_layers(model, "2:4")] == [("0", False, reason)]
    with pytest.raises(ValueError, match=r"cannot export layer '0' \(weight \(6, 8\)\) as pattern '2:4': Conv1D weig"):
        export_sparse(model, tmp_path, pattern="2:4", include="0")
    blocks = "Conv1D weight stored as (6, 8), (out, in) view (8, 6) is not divisible by the block 4x4"
    assert plan_layers(model, "4x4")[0].reason == blocks
    assert plan_layers(model, "2x2")[0].convert


def test_root_pretrained_model(tmp_path):
    gpt2 = prune_(HF_GPT2.make(), "2:4").model.eval()
    ids = input_ids()
    manifest = export_sparse(gpt2, tmp_path, pattern="2:4", example_input={"input_ids": ids})
    assert manifest.huggingface["module"] == "" and "transformer.h.1.mlp.c_proj" in manifest.converted
    assert "(GPT2LMHeadModel at '<root>', from_pretrained verified" in manifest.summary()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, gpt2(input_ids=ids).logits, rtol=0, atol=1e-6)
    loaded = load_sparse(tmp_path, perturbed(HF_GPT2).model)
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, SparseLinear)


def test_hf_false_and_manifest_checks(tmp_path):
    model = prune_(HF_GPT2.make().eval(), "8x8")
    manifest = export_sparse(model, tmp_path / "plain", pattern="8x8", hf=False)
    assert manifest.huggingface is None and not (tmp_path / "plain" / "hf").exists()
    export_sparse(model, tmp_path / "both", pattern="8x8")
    assert Manifest.read(tmp_path / "both").huggingface["dir"] == "hf"
    (tmp_path / "both" / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing \['hf/config.json'\] listed by its manifest"):
        Manifest.read(tmp_path / "both")
    with pytest.raises(TypeError, match="hf must be True, False or None, got 'yes'"):
        export_sparse(model, tmp_path, hf="yes")


def test_unwritable_hf_folder_warns_or_raises(tmp_path, monkeypatch):
    model = prune_(HF_GPT2.make().eval(), "8x8")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.model), "save_pretrained", fail)
    with pytest.warns(UserWarning, match="the export has no Hugging Face folder: save_pretrained failed: OSError: d"):
        manifest = export_sparse(model, tmp_path, pattern="8x8")
    assert manifest.huggingface["dir"] is None and manifest.huggingface["reason"].endswith("OSError: disk full")
    assert manifest.summary().endswith("Hugging Face folder: not written: save_pretrained failed: OSError: disk full")
    assert Manifest.read(tmp_path).converted == manifest.converted  # the sparse export itself is complete
    with pytest.raises(RuntimeError, match=r"cannot write the Hugging Face folder .*: save_pretrained failed"):
        export_sparse(model, tmp_path, pattern="8x8", hf=True)


class LooksLikeHF(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {"model_type": "custom"}
        self.fc = nn.Linear(8, 8)

    def save_pretrained(self, folder):
        raise AssertionError("never called")

    def forward(self, x):
        return self.fc(x)


def test_a_model_that_only_looks_like_hf(tmp_path):
    model = nn.Sequential(LooksLikeHF())
    with pytest.warns(UserWarning, match=r"LooksLikeHF at '0' has save_pretrained and config but is not a transf"):
        manifest = export_sparse(model, tmp_path, pattern="dense")
    record = manifest.huggingface
    assert record["dir"] is None and "not a transformers.PreTrainedModel" in record["reason"]
    with pytest.raises(ValueError, match="hf=True but LooksLikeHF at '0' has save_pretrained and config but is not"):
        export_sparse(model, tmp_path, pattern="dense", hf=True)
    with pytest.raises(ValueError, match="hf=True but the model holds no transformers.PreTrainedModel"):
        export_sparse(nn.Linear(4, 4), tmp_path, pattern="dense", hf=True)


def test_hf_folder_whose_outputs_differ_raises(tmp_path, monkeypatch):
    model = prune_(HF_GPT2.make().eval(), "2:4")
    reload = hf_export._reload

    def broken(folder, like):
        loaded = reload(folder, like)
        loaded.transformer.ln_f.bias.data += 1.0
        return loaded

    monkeypatch.setattr(hf_export, "_reload", broken)
    with pytest.raises(ValueError, match=r"the Hugging Face folder hf/ reloaded with from_pretrained's outputs differ"):
        export_sparse(model, tmp_path, pattern="2:4", example_input={"input_ids": input_ids()})
    assert not (tmp_path / "manifest.json").exists()


def test_several_hf_models_export_the_first(tmp_path):
    model = nn.ModuleDict({"a": HF_LLAMA.make().model, "b": HF_LLAMA.make().model})
    with pytest.warns(UserWarning, match=r"holds 2 separate Hugging Face models \['a', 'b'\]: .* the first one only"):
        manifest = export_sparse(model, tmp_path, pattern="dense")
    assert manifest.huggingface["module"] == "a" and (tmp_path / "hf" / "config.json").is_file()
