import pytest
from torch import nn

from lightning_sparse.targets import default_targets, dense_by_default, describe_targets, select_targets


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.head = nn.Linear(8, 2)


def test_default_targets_cover_linear_conv_and_attention_only():
    assert default_targets(Net()) == [
        "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "cross.q_proj_weight", "cross.k_proj_weight",
        "cross.v_proj_weight", "cross.out_proj.weight", "head.weight",
    ]


def test_include_exclude_and_skips():
    net = Net()
    assert select_targets(net, include=["embed.weight", "*.bias"], exclude=["attn.*"]) == [
        "embed.weight", "conv.bias", "norm.bias", "cross.out_proj.bias", "head.bias"  # *.bias misses in_proj_bias
    ]
    assert select_targets(net, skip_first=True, skip_last=True)[0] == "attn.in_proj_weight"
    assert select_targets(net, skip_last=True)[-1] == "cross.out_proj.weight"


def test_glob_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"include glob 'enc\.\*' matches no parameter"):
        select_targets(Net(), include=["enc.*"])
    with pytest.raises(ValueError, match="exclude glob 'nope' matches no parameter"):
        select_targets(Net(), exclude=["nope"])


def test_a_glob_string_is_a_list_of_one_and_other_types_are_errors():
    assert select_targets(Net(), include="conv.weight") == select_targets(Net(), include=["conv.weight"])
    assert select_targets(Net(), exclude="head.*")[-1] == "cross.out_proj.weight"
    with pytest.raises(TypeError, match=r"include must be a glob string or a list of glob strings, got \[1\]"):
        select_targets(Net(), include=[1])
    with pytest.raises(TypeError, match="exclude must be a glob string or a list of glob strings, got 3"):
        select_targets(Net(), exclude=3)
    with pytest.raises(ValueError, match="no parameter left to sparsify"):
        select_targets(nn.Linear(2, 2), skip_first=True)


class TiedLM(nn.Module):
    """A token embedding, a block and an output head sharing the embedding's weight (like GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def get_output_embeddings(self):
        return self.lm_head


def test_tied_head_is_dense_by_default_and_one_target_when_included():
    model = TiedLM()
    assert default_targets(model) == ["block.weight"]
    assert "wte.weight" in dense_by_default(model) and "lm_head.weight" in dense_by_default(model)["wte.weight"]
    with pytest.warns(UserWarning, match=r"include selects wte.weight, which is tied \(wte.weight = lm_head.weight\)"):
        assert select_targets(model, include="lm_head.weight") == ["wte.weight"]
    assert describe_targets(model, ["block.weight"]) == (
        "sparsifying 1 Linear; left dense: wte.weight (output embedding (get_output_embeddings()); shared with the "
        "nn.Embedding 'wte' (wte.weight = lm_head.weight))"
    )


def test_hf_models_keep_their_output_embeddings_dense():
    pytest.importorskip("transformers")
    from tests.hf_models import HF_GPT2, HF_LLAMA

    gpt2, llama = HF_GPT2.make(), HF_LLAMA.make()
    gpt2_targets = select_targets(gpt2)
    assert len(gpt2_targets) == 8 and all(".h." in n for n in gpt2_targets)
    assert describe_targets(gpt2, gpt2_targets).startswith("sparsifying 8 Conv1D; left dense: model.transformer.wte")
    llama_targets = select_targets(llama)
    assert "model.lm_head.weight" not in llama_targets and len(llama_targets) == 14
    assert select_targets(llama, include="*lm_head*") == ["model.lm_head.weight"]  # untied: no warning
