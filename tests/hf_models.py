"""Tiny Hugging Face models for the harness: GPT-2 (``Conv1D`` layers, head tied to the token embedding) and Llama
(untied ``lm_head``, grouped-query attention), built from configs (nothing is downloaded), trained on dict batches of
bytes of the Python standard library's source."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from lightning_sparse.models import HFCausalLM
from tests.harness import BATCHES_PER_EPOCH, HarnessModel

GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 256,
        "bos_token_id": 0, "eos_token_id": 0,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # no dropout: Lightning does not restore the RNG
LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256, "max_position_embeddings": 32}
BATCH, LENGTH = 4, 16


def text_batches(batches: int = BATCHES_PER_EPOCH) -> torch.utils.data.DataLoader:
    """``{"input_ids", "labels"}`` batches of bytes of ``textwrap.py`` (same every call)."""
    raw = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()[: batches * BATCH * LENGTH]
    ids = torch.tensor(list(raw), dtype=torch.long).reshape(-1, LENGTH)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    return torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=False)


def _factory(config: dict):
    def make() -> HFCausalLM:
        torch.manual_seed(0)
        return HFCausalLM(config=dict(config), lr=1e-2)

    return make


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"])


HF_GPT2 = HarnessModel("hf-gpt2", _factory(GPT2), text_batches, _logits)
HF_LLAMA = HarnessModel("hf-llama", _factory(LLAMA), text_batches, _logits)
HF_MODELS = [HF_GPT2, HF_LLAMA]
