"""A plain multi-layer perceptron classifier."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_sparse.models.base import ClassifierModule, check_positive_int


class MLP(ClassifierModule):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a ``Linear`` to the classes.

    The layers live in one ``nn.Sequential`` named ``net``: ``net.1``, ``net.3``, ... are the ``nn.Linear``s.

    Args:
        input_shape: shape of one input, without the batch dimension.
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: number of classes.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        scheduler: ``None`` or ``"cosine"``.

    Raises:
        ValueError: if a size is not a positive integer or an optimizer argument is invalid.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import FashionMNISTDataModule
        from lightning_sparse.models import MLP

        trainer = Trainer(max_epochs=3)
        trainer.fit(MLP(hidden=(300, 100)), datamodule=FashionMNISTDataModule())
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        hidden: tuple[int, ...] = (1024, 1024),
        num_classes: int = 10,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = "cosine",
    ) -> None:
        super().__init__(num_classes, optimizer, lr, weight_decay, momentum, scheduler)
        self.save_hyperparameters()
        check_positive_int(**{f"input_shape[{i}]": s for i, s in enumerate(input_shape)})
        check_positive_int(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        sizes = [math.prod(input_shape), *hidden, num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B, num_classes)`` for ``x`` of shape ``(B, *input_shape)``."""
        return self.net(x)
