"""A tiny character-level GPT (decoder-only transformer) for byte-level language modelling."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lightning_sparse.models.base import build_optimizer, check_optimizer_args, check_positive_int
from lightning_sparse.models.transformer import TransformerBlock


class MeanPerplexity(MeanMetric):
    """``exp`` of the weighted mean of the cross-entropy values it is updated with."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class CharGPT(L.LightningModule):
    """Token and position embeddings, causal pre-norm :class:`TransformerBlock` s, final LayerNorm, linear head.

    Trained with next-token cross entropy on ``(x, y)`` batches of shape ``(B, T)`` with ``T <= block_size``
    (see ``PythonSourceDataModule``). Logs ``train_loss``, ``val_loss``, ``val_ppl`` (exp of the mean
    validation loss), ``test_loss`` and ``test_ppl``.

    Args:
        vocab_size: number of token ids (256 for bytes).
        block_size: longest context the position embedding covers.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        scheduler: ``None`` or ``"cosine"``.

    Raises:
        ValueError: if a size is not a positive integer, ``heads`` does not divide ``dim``, an optimizer argument is
            invalid, or (in ``forward``) the input is longer than ``block_size``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import PythonSourceDataModule
        from lightning_sparse.models import CharGPT

        trainer = Trainer(max_steps=2000)
        trainer.fit(CharGPT(block_size=128), datamodule=PythonSourceDataModule(block_size=128))
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = "cosine",
    ) -> None:
        super().__init__()
        check_positive_int(vocab_size=vocab_size, block_size=block_size, depth=depth)
        check_optimizer_args(optimizer, lr, weight_decay, scheduler)
        self.save_hyperparameters()
        self.block_size = block_size
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        causal = torch.ones(block_size, block_size, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)
        self.val_ppl = MeanPerplexity()
        self.test_ppl = MeanPerplexity()
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``, ``T <= block_size``."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"input length must be <= block_size, got length={t}, block_size={self.block_size}")
        x = self.tok_embed(idx) + self.pos_embed(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, attn_mask=self.causal_mask[:t, :t])
        return self.head(self.norm(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, ppl: MeanPerplexity) -> None:
        loss = self._loss(batch)
        ppl.update(loss, weight=batch[0].shape[0])
        self.log(f"{stage}_loss", loss, sync_dist=True)
        self.log(f"{stage}_ppl", ppl, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return build_optimizer(self, hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.scheduler)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, n: int) -> torch.Tensor:
        """Appends ``n`` greedily decoded tokens to ``prompt_ids`` of shape ``(B, T)``; returns ``(B, T + n)``.

        Example::

            import torch
            from lightning_sparse.models import CharGPT

            model = CharGPT(block_size=64)  # a trained one, in practice
            ids = torch.tensor([list(b"def ")])
            bytes(model.generate(ids, 40)[0].tolist()).decode(errors="replace")
        """
        ids = prompt_ids
        for _ in range(n):
            logits = self(ids[:, -self.block_size :])[:, -1]
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return ids
