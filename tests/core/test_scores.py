import pytest
import torch

from lightning_sparse.core import scores


def test_gradient_scores():
    w, g = torch.tensor([-2.0, 0.5]), torch.tensor([0.5, -4.0])
    assert scores.gradient(g).tolist() == [0.5, 4.0]
    assert scores.snip(w, g).tolist() == [1.0, 2.0]
    assert scores.reciprocal_sensitivity(w, g).tolist() == pytest.approx([4.0, 0.125])
    assert scores.mest(w, g, gamma=0.5).tolist() == [2.25, 2.5]


def test_momentum_from_sgd_and_adam_and_error():
    assert scores.momentum({"momentum_buffer": torch.tensor([-3.0])}).tolist() == [3.0]
    adam = {"exp_avg": torch.tensor([-2.0]), "exp_avg_sq": torch.tensor([4.0])}
    assert scores.momentum(adam).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum scores need an optimizer with momentum"):
        scores.momentum({"step": torch.tensor(1.0)})


def test_random_is_reproducible_from_generator():
    a = scores.random(torch.empty(5), torch.Generator().manual_seed(3))
    b = scores.random(torch.empty(5), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5,)
