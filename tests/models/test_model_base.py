import pytest
import torch
from torch import nn

from lightning_sparse.models.base import ClassifierModule, build_optimizer, check_optimizer_args, check_positive_int


class LinearClassifier(ClassifierModule):
    def __init__(self, optimizer: str = "adam", lr: float = 1e-2, scheduler: str | None = "cosine"):
        super().__init__(num_classes=10, optimizer=optimizer, lr=lr, scheduler=scheduler, weight_decay=1e-4)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_optimizers(name, cls):
    model = LinearClassifier(optimizer=name)
    opt = build_optimizer(model, name, lr=0.1, weight_decay=0.01, momentum=0.5, scheduler=None)
    assert type(opt) is cls and opt.defaults["lr"] == 0.1 and opt.defaults["weight_decay"] == 0.01
    assert sum(len(g["params"]) for g in opt.param_groups) == 2


def test_sgd_uses_momentum():
    opt = build_optimizer(LinearClassifier(), "sgd", lr=0.1, weight_decay=0.0, momentum=0.5, scheduler=None)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5


def test_fit_logs_metrics_and_cosine_schedule(digits, fast_trainer):
    model = LinearClassifier()
    trainer = fast_trainer(fast_dev_run=False, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, datamodule=digits)
    config = trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config.interval == "step" and config.scheduler.T_max == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert 0 <= trainer.callback_metrics["val_acc"] <= 1
    results = trainer.test(model, datamodule=digits, verbose=False)[0]
    assert set(results) == {"test_loss", "test_acc"}


def test_val_acc_is_plain_accuracy(digits, fast_trainer):
    model = LinearClassifier()
    trainer = fast_trainer(fast_dev_run=False, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=digits)
    x, y = digits.val_set.tensors
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean()
    assert trainer.callback_metrics["val_acc"] == pytest.approx(expected.item(), abs=1e-6)


def test_cosine_needs_finite_run(digits, fast_trainer):
    trainer = fast_trainer(fast_dev_run=False, max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="scheduler='cosine' needs a finite run"):
        trainer.fit(LinearClassifier(), datamodule=digits)


def test_metrics_not_in_state_dict():
    assert set(LinearClassifier().state_dict()) == {"net.1.weight", "net.1.bias"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, r"optimizer must be one of \('adam', 'adamw', 'sgd'\), got 'rmsprop'"),
        ({"scheduler": "step"}, r"scheduler must be one of \(None, 'cosine'\), got 'step'"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0"),
    ],
)
def test_invalid_optimizer_args(kwargs, match):
    args = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine", **kwargs}
    with pytest.raises(ValueError, match=match):
        check_optimizer_args(**args)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_check_positive_int(value):
    with pytest.raises(ValueError, match=f"width must be a positive integer, got {value!r}"):
        check_positive_int(depth=2, width=value)


def test_classifier_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        ClassifierModule(num_classes=0)
