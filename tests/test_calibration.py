"""Calibration: how batches reach the model, block-by-block SparseGPT equal to the full sequential mode."""

import copy

import pytest
import torch
from torch import nn

import lightning_sparse.callbacks.sparsegpt as sparsegpt_module
from lightning_sparse import sparsegpt_
from lightning_sparse.calibration import BlockInputs, default_forward, find_blocks, shared_input_groups


class Seen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fc(args[0] if args else kwargs["input_ids"])


def test_default_forward_passes_batches_as_a_step_would():
    model = Seen()
    x = torch.randn(3, 2)
    default_forward(model, {"input_ids": x, "flag": 1})
    default_forward(model, (x, "labels"))
    default_forward(model, x)
    (_, kwargs), (args1, _), (args2, _) = model.calls
    assert torch.equal(kwargs["input_ids"], x) and kwargs["flag"] == 1
    assert torch.equal(args1[0], x) and torch.equal(args2[0], x)


def test_a_batch_it_cannot_pass_says_how_to_pass_forward():
    with pytest.raises(TypeError, match=r"cannot pass a calibration batch of type str .* pass forward=lambda model"):
        default_forward(Seen(), "text")
    with pytest.raises(TypeError, match="of type str"):
        sparsegpt_(nn.Sequential(nn.Linear(4, 4)), ["text"], density=0.5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * self.k(x))


class Stack(nn.Module):
    def __init__(self, called: bool = True) -> None:
        super().__init__()
        self.called = called
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x) if self.called else Block.forward(block, x)  # not called: no module hooks on the block
        return self.head(x)


def test_find_blocks_needs_every_target_inside_the_list():
    model = Stack()
    inner = [n for n, _ in model.named_parameters() if n.startswith("blocks") and n.endswith("weight")]
    assert find_blocks(model, inner) == "blocks"
    assert find_blocks(model, [*inner, "head.weight"]) is None


def test_shared_inputs_are_grouped_and_blocks_chain():
    model = Stack()
    batches = [torch.randn(5, 4) for _ in range(2)]
    inputs = BlockInputs(model, "blocks", batches, default_forward)
    names = ["blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.o.weight"]
    owners = {n: n.rsplit(".", 1)[0] for n in names}
    run = inputs.forward_block(0)
    assert shared_input_groups(model, names, owners, lambda: run(model, inputs.calls[0])) == [names[:2], names[2:]]
    inputs.advance(0)
    inputs.advance(1)
    with torch.no_grad():
        assert torch.equal(model.head(inputs.calls[0][0][0]), model(batches[0]))


def test_a_forward_that_never_reaches_the_blocks_is_an_error():
    with pytest.raises(ValueError, match=r"never reached blocks.0"):
        BlockInputs(Stack(), "blocks", [torch.randn(2, 4)], lambda model, batch: model.embed(batch))


def _without_blocks(monkeypatch):
    monkeypatch.setattr(sparsegpt_module, "find_blocks", lambda model, names: None)


@pytest.mark.parametrize("called", [True, False], ids=["blocks", "blocks-not-called"])
@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"density": 0.3}])
def test_block_by_block_equals_the_full_sequential_mode(pattern, called, monkeypatch):
    torch.manual_seed(0)
    model = Stack(called)
    reference = copy.deepcopy(model)
    batches = [torch.randn(6, 4) for _ in range(3)]
    include = ["blocks.*.weight"]
    masks = sparsegpt_(model, batches, include=include, progress=False, **pattern)
    _without_blocks(monkeypatch)
    expected = sparsegpt_(reference, batches, include=include, progress=False, **pattern)
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_hf_models_block_by_block_equal_the_full_sequential_mode(monkeypatch):
    pytest.importorskip("transformers")
    from tests.hf_models import HF_MODELS, text_batches

    for spec in HF_MODELS:
        model = spec.make()
        reference = copy.deepcopy(model)
        batches = list(text_batches(3))
        masks = sparsegpt_(model, batches, nm="2:4", progress=False)
        with monkeypatch.context() as patch:
            _without_blocks(patch)
            expected = sparsegpt_(reference, batches, nm="2:4", progress=False)
        assert masks.keys() == expected.keys() and len(masks) > 4
        for name in expected:
            assert torch.equal(masks[name], expected[name]), f"{spec.name}: {name}"
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q), f"{spec.name}: {name}"
        head = model.get_output_embeddings().weight
        assert torch.equal(head, reference.get_output_embeddings().weight) and (head != 0).all()


def test_blocks_order_prunes_each_block_from_one_pass_of_it():
    torch.manual_seed(0)
    model = Stack()
    reference = copy.deepcopy(model)
    batches = [torch.randn(6, 4) for _ in range(3)]
    masks = sparsegpt_(model, batches, nm="2:4", include="blocks.*.weight", sequential="blocks", progress=False)
    expected = {}
    for index in range(len(reference.blocks)):  # one pass over the already-pruned blocks before, then prune all
        expected |= sparsegpt_(reference, batches, nm="2:4", include=f"blocks.{index}.*.weight", sequential=False,
                               progress=False)
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sequential_must_be_a_known_mode():
    with pytest.raises(ValueError, match=r"sequential must be True, False or 'blocks', got 'layers'"):
        sparsegpt_(Stack(), [torch.randn(2, 4)], nm="2:4", sequential="layers")
