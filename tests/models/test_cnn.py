import pytest
import torch

from lightning_sparse.models.cnn import SmallCNN


@pytest.mark.parametrize(("image_size", "flat"), [(28, 64 * 7 * 7), (8, 64 * 2 * 2), (5, 64)])
def test_forward_shape(image_size, flat):
    model = SmallCNN(image_size=image_size, num_classes=3)
    assert model.classifier[1].in_features == flat
    assert model(torch.randn(2, 1, image_size, image_size)).shape == (2, 3)


def test_layers_and_state_dict():
    model = SmallCNN(in_channels=3, width=8)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 8, (3, 3)), (8, 16, (3, 3))]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sorted(model.state_dict()) == sorted(
        f"{name}.{p}"
        for name in ("features.0", "features.3", "classifier.1", "classifier.3")
        for p in ("weight", "bias")
    )


def test_fit(digits, fast_trainer):
    model = SmallCNN(image_size=8, width=8, optimizer="adamw")
    before = model.features[0].weight.detach().clone()
    trainer = fast_trainer()
    trainer.fit(model, datamodule=digits)
    assert trainer.global_step == 2 and not torch.equal(before, model.features[0].weight)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 3}, r"image_size must be an integer >= 4 \(two 2x2 max-pools\), got 3"),
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"in_channels": -1}, "in_channels must be a positive integer, got -1"),
        ({"scheduler": "linear"}, "scheduler must be one of"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallCNN(**kwargs)
