"""Supermask: straight-through score gradients, exact tile budgets, score state across checkpoints, attention
``out_proj``, export without scores, argument errors."""

import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sparse.callbacks import SparsityScheduler, Supermask
from lightning_sparse.callbacks.supermask import SUFFIX, parse_tile_size, supermask_weight, tile_sums
from tests import harness


def _fit(callbacks, model=None, ckpt_path=None, **kwargs):
    model = harness.plain_model() if model is None else model
    trainer = pl.Trainer(
        callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **{"max_epochs": 2, "enable_checkpointing": False, **kwargs},
    )
    trainer.fit(model, harness.harness_data(), ckpt_path=ckpt_path)
    return model


def _tile_grid(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(rows of tiles, cols of tiles)`` bool grid: True where the tile has a non-zero entry."""
    return tile_sums(mask.reshape(mask.shape[0], -1).ne(0), parse_tile_size(f"{rows}x{cols}")) > 0


class ScoreProbe(pl.Callback):
    """Per optimizer step: score gradients, kept tiles against the budget, and the model's state_dict keys."""

    def __init__(self):
        self.rows, self.keys = [], set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        supermask = harness.sparsity_callback(trainer.callbacks)
        densities = supermask.layer_densities(trainer.global_step)
        self.keys |= set(pl_module.state_dict())
        for name, scores in supermask.scores.items():
            tiles = int(supermask.pattern.compress(supermask.masks.masks[name]).sum())
            self.rows.append({"name": name, "grad": scores.grad.clone(), "tiles": tiles,
                              "budget": round(densities[name] * scores.numel())})


def test_supermask_weight_passes_the_tile_gradient_straight_through():
    weight = torch.arange(1.0, 17.0).reshape(4, 4).requires_grad_()
    scores = torch.zeros(2, 2, requires_grad=True)
    keep = torch.tensor([[True, False], [False, True]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    grad = torch.linspace(-1, 1, 16).reshape(4, 4)
    out = supermask_weight(weight, scores, keep, parse_tile_size(2))
    out.backward(grad)
    assert torch.equal(out, torch.where(keep, weight, 0).detach())
    assert torch.equal(weight.grad, torch.where(keep, grad, 0))
    expected = (weight.detach() * grad).reshape(2, 2, 2, 2).sum(dim=(1, 3))
    torch.testing.assert_close(scores.grad, expected)


def test_scores_learn_under_the_exact_tile_budget():
    probe = ScoreProbe()
    supermask = Supermask(tile_size=4, bake_at_end=False)
    _fit([SparsityScheduler(density=0.25, end=0.5), supermask, probe])
    assert len(probe.rows) == 8 * 4
    assert all(row["tiles"] == row["budget"] for row in probe.rows)
    budgets = [row["budget"] for row in probe.rows if row["name"] == "body.0.weight"]
    assert budgets[0] == 256 and budgets[-1] == 64 and len(set(budgets)) > 2
    assert all(row["grad"].abs().sum() > 0 for row in probe.rows)
    assert not any(key.endswith(SUFFIX) for key in probe.keys)
    supermask.generator.manual_seed(0)
    initial = {n: supermask.initial_scores(p) for n, p in supermask.masks.params.items()}
    assert all(not torch.equal(supermask.scores[n].detach(), initial[n]) for n in initial)


def test_checkpoint_restores_scores_and_their_optimizer_state(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    _fit([Supermask(density=0.25, tile_size=4), checkpoint], enable_checkpointing=True, max_epochs=1)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    assert not any(key.endswith(SUFFIX) for key in saved["state_dict"])
    seen = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            supermask, optimizer = harness.sparsity_callback(trainer.callbacks), trainer.optimizers[0]
            index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
            seen["states"] = {index[id(s)]: {k: v.clone() for k, v in optimizer.state[s].items()}
                              for s in supermask.scores.values()}
            seen["scores"] = {n: s.detach().clone() for n, s in supermask.scores.items()}

    _fit([Supermask(density=0.25, tile_size=4), Capture()], max_epochs=2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    stored = next(v for k, v in saved["callbacks"].items() if k.startswith("Supermask"))["scores"]
    assert all(torch.equal(seen["scores"][n], s) for n, s in stored.items())
    assert len(seen["states"]) == 4
    for index, state in seen["states"].items():
        expected = saved["optimizer_states"][0]["state"][index]
        assert torch.equal(state["exp_avg"], expected["exp_avg"]) and expected["exp_avg"].abs().sum() > 0
        assert torch.equal(state["exp_avg_sq"], expected["exp_avg_sq"])


class AttentionNet(pl.LightningModule):
    """Linear embedding, ``nn.MultiheadAttention(32, 4)``, mean pooling, Linear head, on the harness data."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        h = self.embed(x.transpose(1, 2))
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_attention_out_proj_is_masked():
    torch.manual_seed(0)
    probe = ScoreProbe()
    supermask = Supermask(density=0.5, tile_size=16, include=["attn.*_weight", "attn.out_proj.weight"])
    final = harness.FinalOutput()
    model = _fit([supermask, probe, final], model=AttentionNet())
    assert sorted(supermask.masks.params) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert all(row["grad"].abs().sum() > 0 for row in probe.rows if row["name"] == "attn.out_proj.weight")
    out_tiles = _tile_grid(model.attn.out_proj.weight.detach(), 16, 16)
    assert int(out_tiles.sum()) == 2 and out_tiles.numel() == 4
    assert int(_tile_grid(model.attn.in_proj_weight.detach(), 16, 16).sum()) == 6
    plain = AttentionNet()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(final.batch[0]), final.output)


def test_bake_removes_the_scores():
    supermask = Supermask(density=0.25, tile_size=4, bake_at_end=False)
    model = _fit([supermask], max_epochs=1)
    assert sum(name.endswith(SUFFIX) for name, _ in model.named_parameters()) == 4
    assert not any(key.endswith(SUFFIX) for key in model.state_dict())
    harness.plain_model().load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(harness.plain_model().state_dict(), strict=True)  # a plain state dict: scores may be absent
    supermask.bake()
    assert not any(name.endswith(SUFFIX) for name, _ in model.named_parameters())
    assert sorted(model.state_dict()) == sorted(harness.plain_model().state_dict())


class NoScoreOptimizer(harness.HarnessNet):
    def configure_optimizers(self):
        return torch.optim.Adam([p for n, p in self.named_parameters() if not n.endswith(SUFFIX)])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0.0}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, ValueError, r"density must be in \(0, 1\]"),
        ({"density": 0.5, "tile_size": "16x"}, ValueError, "tile_size must be an int or an 'RxC' string"),
        ({"density": 0.5, "tile_size": "4by4"}, ValueError, "tile_size must be an int or an 'RxC' string"),
        ({"density": 0.5, "tile_size": "0x4"}, ValueError, "tile_size sides must be >= 1"),
        ({"density": 0.5, "tile_size": 0}, ValueError, "tile_size sides must be >= 1"),
        ({"density": 0.5, "tile_size": 4.0}, TypeError, "tile_size must be an int or an 'RxC' string, got float"),
        ({"density": 0.5, "score_init": "zeros"}, ValueError, "score_init must be one of"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Supermask(**kwargs)


def test_tile_that_does_not_divide_a_layer_is_named():
    with pytest.raises(ValueError, match=r"tile_size=16 \(16x16 blocks of the \(out, in\) view\) does not tile "
                       r"head.weight: a Linear weight stored as \(8, 32\)"):
        _fit([Supermask(density=0.5, tile_size=16, exclude=["conv.weight"])])
    # the case: the argument as written, the layer, its shape and a tile that fits it
    with pytest.raises(ValueError, match=r"^tile_size=7 \(7x7 blocks of the \(out, in\) view\) does not tile "
                       r"conv.weight: a Conv1d weight stored as \(8, 4, 2\), \(out, in\) view 8x8; choose a block "
                       r"whose sides divide 8 and 8 \(e.g. tile_size=4\), or exclude 'conv.weight'$"):
        _fit([Supermask(density=0.5, tile_size=7)])
    with pytest.raises(ValueError, match=r"^tile_size='8x32' \(8x32 blocks .* conv.weight: .* \(e.g. tile_size=8\)"):
        _fit([Supermask(density=0.5, tile_size="8x32")])


def test_scores_outside_the_optimizer_are_rejected():
    with pytest.raises(ValueError, match="no optimizer updates the tile scores"):
        torch.manual_seed(0)
        _fit([Supermask(density=0.5, tile_size=4)], model=NoScoreOptimizer())


class NetWithAScoreAttribute(harness.HarnessNet):
    def __init__(self):
        super().__init__()
        self.head.weight_supermask_scores = nn.Parameter(torch.zeros(1))


def test_a_model_attribute_in_the_scores_place_is_not_overwritten():
    with pytest.raises(ValueError, match="Supermask: head already has an attribute 'weight_supermask_scores'"):
        _fit([Supermask(density=0.5, tile_size=4)], model=NetWithAScoreAttribute())


def test_a_checkpoint_with_other_scores_is_refused():
    supermask = Supermask(density=0.5, tile_size=4, bake_at_end=False)
    _fit([supermask], max_epochs=1)
    names = sorted(supermask.scores)
    stored = {"scores": {"body.0.weight": supermask.scores["body.0.weight"].detach().clone()}}
    expected = rf"holds Supermask scores for \['body.0.weight'\], not {re.escape(str(names))}"
    with pytest.raises(ValueError, match=expected):
        supermask.load_extra_state_dict(stored)
