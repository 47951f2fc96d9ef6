import pytest
import torch
import torch.nn.functional as F

from lightning_sparse.models.vit import TinyViT


def test_forward_shape():
    model = TinyViT(image_size=8, patch_size=4, in_channels=2, num_classes=5, dim=16, depth=3, heads=2)
    assert model(torch.randn(3, 2, 8, 8)).shape == (3, 5)
    assert model.pos_embed.shape == (1, 4 + 1, 16) and len(model.blocks) == 3


def test_patchify_matches_unfold():
    model = TinyViT(image_size=8, patch_size=4, in_channels=3, dim=16, heads=2)
    x = torch.randn(2, 3, 8, 8)
    expected = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)
    assert torch.equal(model.patchify(x), expected)


def test_standard_parameter_names():
    keys = set(TinyViT(dim=16, heads=2, depth=1).state_dict())
    for name in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight"):
        assert f"blocks.0.{name}" in keys
    assert {"patch_embed.weight", "cls_token", "pos_embed", "head.weight", "norm.weight"} <= keys


def test_fit(digits, fast_trainer):
    model = TinyViT(image_size=8, patch_size=2, dim=16, depth=1, heads=2)
    trainer = fast_trainer()
    trainer.fit(model, datamodule=digits)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 5}, "patch_size must divide image_size, got patch_size=5, image_size=28"),
        ({"patch_size": 0}, "patch_size must be a positive integer, got 0"),
        ({"dim": 30, "heads": 4}, "heads must divide dim, got dim=30, heads=4"),
        ({"depth": 0}, "depth must be a positive integer, got 0"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a positive integer, got 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyViT(**kwargs)
