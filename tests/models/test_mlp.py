import pytest
import torch
from torch import nn

from lightning_sparse.models.mlp import MLP


def test_forward_shape_and_layers():
    model = MLP(input_shape=(1, 8, 8), hidden=(32, 16), num_classes=7)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 7)
    linears = [(m.in_features, m.out_features) for m in model.net if isinstance(m, nn.Linear)]
    assert linears == [(64, 32), (32, 16), (16, 7)]
    assert list(model.state_dict()) == [f"net.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")]


def test_no_hidden_is_linear():
    model = MLP(input_shape=(3, 4), hidden=())
    assert [type(m) for m in model.net] == [nn.Flatten, nn.Linear] and model.net[1].in_features == 12


def test_fit_and_reload(digits, fast_trainer, tmp_path):
    model = MLP(input_shape=(1, 8, 8), hidden=(32,), optimizer="sgd", lr=0.05)
    trainer = fast_trainer()
    trainer.fit(model, datamodule=digits)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    trainer.save_checkpoint(tmp_path / "mlp.ckpt")
    loaded = MLP.load_from_checkpoint(tmp_path / "mlp.ckpt")
    assert loaded.hparams.optimizer == "sgd" and tuple(loaded.hparams.hidden) == (32,)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": (16, 0)}, r"hidden\[1\] must be a positive integer, got 0"),
        ({"input_shape": (1, -8, 8)}, r"input_shape\[1\] must be a positive integer, got -8"),
        ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)
