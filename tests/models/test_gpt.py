import math

import pytest
import torch

from lightning_sparse.models.gpt import CharGPT


def small_gpt(**kwargs) -> CharGPT:
    return CharGPT(**{"block_size": 16, "dim": 32, "depth": 1, "heads": 4, **kwargs})


def test_forward_shape_and_state_dict():
    model = small_gpt(vocab_size=50)
    assert model(torch.randint(0, 50, (3, 10))).shape == (3, 10, 50)
    keys = set(model.state_dict())
    assert "causal_mask" not in keys and {"tok_embed.weight", "pos_embed.weight", "head.weight"} <= keys
    assert {"blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight", "blocks.0.mlp.0.weight"} <= keys


def test_causal():
    torch.manual_seed(0)
    model = small_gpt().eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_fit_logs_perplexity(python_source, fast_trainer):
    model = small_gpt()
    trainer = fast_trainer()
    trainer.fit(model, datamodule=python_source)
    metrics = trainer.callback_metrics
    assert math.isclose(metrics["val_ppl"].item(), math.exp(metrics["val_loss"].item()), rel_tol=1e-4)
    assert metrics["train_loss"] < math.log(256) + 1
    results = trainer.test(model, datamodule=python_source, verbose=False)[0]
    assert set(results) == {"test_loss", "test_ppl"}
    assert math.isclose(results["test_ppl"], math.exp(results["test_loss"]), rel_tol=1e-4)


def test_generate():
    model = small_gpt().eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 20)  # longer than block_size: the context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out[:, 5], model(prompt)[:, -1].argmax(-1))


def test_too_long_input():
    with pytest.raises(ValueError, match="input length must be <= block_size, got length=17, block_size=16"):
        small_gpt()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 30}, "heads must divide dim, got dim=30, heads=4"),
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"optimizer": "adagrad"}, "optimizer must be one of"),
        ({"lr": -1.0}, "lr must be > 0, got -1.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_gpt(**kwargs)
