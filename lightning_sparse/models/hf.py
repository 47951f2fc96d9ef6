"""A LightningModule around a Hugging Face ``AutoModelForCausalLM`` (the optional ``[hf]`` extra).

``transformers`` is imported when an :class:`HFCausalLM` is built, not when this module is, so
``lightning_sparse.models`` imports (and the CLI registers ``HFCausalLM``) without it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.models.base import check_optimizer_args
from lightning_sparse.models.gpt import MeanPerplexity

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

IGNORE_INDEX = -100
"""Target id that is not scored (the Hugging Face convention for padding and prompt tokens)."""

_INSTALL_HINT = 'HFCausalLM needs transformers, the [hf] extra: pip install "lightning-sparse[hf]"'


def _import_transformers() -> Any:
    """The ``transformers`` module, or an ``ImportError`` that says how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return transformers


def _warn_unknown_fields(cls: type, fields: Mapping[str, Any]) -> None:
    """Warns about fields a config class does not define: transformers keeps them silently as extra attributes, so a
    typo (``n_embed`` for ``n_embd``) would otherwise build a model of the default size."""
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | set(inspect.signature(cls).parameters)
    unknown = sorted(set(fields) - known - {"attn_implementation"})
    if unknown:
        warnings.warn(
            f"config fields {unknown} are not fields of {cls.__name__} (a typo?); transformers keeps them as extra "
            "attributes that the model does not read",
            UserWarning,
            stacklevel=4,
        )


def _build_config(transformers: Any, config: Mapping[str, Any] | None, config_class: str | None) -> PretrainedConfig:
    """The ``PretrainedConfig`` of :class:`HFCausalLM`'s ``config`` / ``config_class`` arguments."""
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict of config fields, got {type(config).__name__}: {config!r}")
    fields = dict(config or {})
    if config_class is not None:
        cls = getattr(transformers, config_class, None) if isinstance(config_class, str) else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
            raise ValueError(
                "config_class must name a transformers config class such as 'GPT2Config' or 'LlamaConfig', "
                f"got {config_class!r}"
            )
        model_type = fields.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"config['model_type'] must match config_class={config_class!r} (model_type {cls.model_type!r}) "
                f"or be left out, got {model_type!r}"
            )
    else:
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                "config must have a 'model_type' key such as 'gpt2' or 'llama' (or pass config_class), "
                f"got keys {sorted(fields)}"
            )
        if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
            raise ValueError(
                f"config['model_type'] must be a transformers model type such as 'gpt2' or 'llama', got {model_type!r}"
            )
        cls = transformers.CONFIG_MAPPING[model_type]
    _warn_unknown_fields(cls, fields)
    return cls(**fields)


def _build_model(transformers: Any, config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialized ``AutoModelForCausalLM`` for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"model_type {config.model_type!r} has no causal language model in transformers (AutoModelForCausalLM); "
            "use a decoder such as 'gpt2' or 'llama'"
        )
    return transformers.AutoModelForCausalLM.from_config(config)


def _load_pretrained(transformers: Any, pretrained: str | os.PathLike) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` of a local folder, in the default dtype; never downloads."""
    folder = os.fspath(pretrained)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"pretrained must be a local folder written by save_pretrained (nothing is downloaded), got {folder!r}"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model.to(torch.get_default_dtype())  # float weights for the optimizer; the Trainer's precision casts


def _linear_warmup(step: int, warmup_steps: int) -> float:
    """The LambdaLR factor: ``(step + 1) / warmup_steps`` up to 1 (1 throughout when ``warmup_steps == 0``)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


class HFCausalLM(L.LightningModule):
    """A Hugging Face causal language model (``AutoModelForCausalLM``) trained with next-token cross entropy.

    The model is built in ``__init__`` (so the callbacks' ``setup`` sees its parameters) and kept at ``self.model``
    (also :attr:`hf_model`), either from a config, freshly initialized, or from a local ``save_pretrained`` folder
    (loaded with ``local_files_only=True``, cast to the default dtype). Exactly one of ``config`` (or
    ``config_class``) and ``pretrained`` is given.

    Batches are either ``(x, y)`` pairs of token ids of shape ``(B, T)`` with ``y`` the targets of each position (``x``
    shifted by one, as ``PythonSourceDataModule`` yields), or dicts in the Hugging Face convention
    ``{"input_ids", "labels", "attention_mask"}`` (the last two optional) where ``labels`` are aligned with
    ``input_ids`` and shifted here: position ``t`` is scored against ``labels[:, t + 1]``. Without ``labels`` the
    targets are ``input_ids`` with the padding (``attention_mask == 0``) left out. Targets equal to ``-100`` are not
    scored, in both kinds of batch. The loss is the mean cross entropy over the scored tokens, so a pair
    ``(ids[:, :-1], ids[:, 1:])`` and the dict ``{"input_ids": ids}`` give the same loss. Logs ``train_loss``,
    ``val_loss``, ``val_ppl``, ``test_loss`` and ``test_ppl`` (exp of the token-weighted mean loss).

    Trained with AdamW, weight decay on the parameters of two or more dimensions only (none on biases and norms), and
    a per-step LambdaLR that warms the learning rate up linearly over ``warmup_steps`` optimizer steps.

    Args:
        config: config fields, with a ``model_type`` key such as ``"gpt2"`` or ``"llama"``; built with
            ``transformers.AutoConfig.for_model(model_type, **fields)``. Fields that the config class does not define
            are passed on with a warning (transformers would keep a typo silently).
        config_class: a transformers config class name such as ``"GPT2Config"`` or ``"LlamaConfig"``, instantiated
            with the ``config`` fields (whose ``model_type``, if given, must match); ``config`` may then be left out
            for the class defaults.
        pretrained: a local folder written by ``save_pretrained``, loaded with
            ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)``. ``load_from_checkpoint`` reads
            it again before loading the checkpoint's weights.
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the parameters with two or more dimensions.
        warmup_steps: optimizer steps of linear warmup (0: the full ``lr`` from the first step).
        betas: AdamW ``(beta1, beta2)``, each in ``[0, 1)``.

    Raises:
        ValueError: if neither or both of ``config`` (or ``config_class``) and ``pretrained`` are given, ``config``
            has no or an unknown ``model_type`` (or one without a causal LM), ``config_class`` is not a transformers
            config class, ``lr <= 0``, ``weight_decay < 0``, ``warmup_steps`` is not an integer >= 0, ``betas`` is
            not two numbers in ``[0, 1)``, or a batch is neither an ``(x, y)`` pair nor a dict with ``input_ids``.
        FileNotFoundError: if ``pretrained`` is not a folder.
        ImportError: if transformers is not installed (``pip install "lightning-sparse[hf]"``).

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.data import PythonSourceDataModule
        from lightning_sparse.models import HFCausalLM

        config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 128}
        model = HFCausalLM(config=config, lr=1e-3, warmup_steps=100)
        Trainer(max_steps=2000).fit(model, datamodule=PythonSourceDataModule(block_size=128))

        model.hf_model.save_pretrained("tiny-llama")  # a Hugging Face folder, and back
        model = HFCausalLM(pretrained="tiny-llama")
    """

    def __init__(
        self,
        config: dict | None = None,
        config_class: str | None = None,
        pretrained: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        has_config = config is not None or config_class is not None
        if has_config == (pretrained is not None):
            raise ValueError(
                "exactly one of config (or config_class) and pretrained must be given, got "
                f"config={config!r}, config_class={config_class!r}, pretrained={pretrained!r}"
            )
        check_optimizer_args("adamw", lr, weight_decay, None)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        transformers = _import_transformers()
        self.save_hyperparameters()
        if pretrained is not None:
            self.model = _load_pretrained(transformers, pretrained)
        else:
            self.model = _build_model(transformers, _build_config(transformers, config, config_class))
        self.val_ppl = MeanPerplexity()
        self.test_ppl = MeanPerplexity()

    @property
    def hf_model(self) -> PreTrainedModel:
        """The wrapped ``PreTrainedModel`` (``save_pretrained``, ``generate``, ...)."""
        return self.model

    def get_output_embeddings(self) -> nn.Module | None:
        """The language-model head of the wrapped model (``hf_model.get_output_embeddings()``)."""
        return self.model.get_output_embeddings()

    def forward(
        self, input_ids: torch.Tensor | Mapping[str, Any], attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``input_ids`` of shape ``(B, T)``.

        ``model(**batch)`` and ``model(batch)`` (how SparseGPT calibrates on a dict batch) work on a dict batch too:
        its ``labels`` are ignored (the loss is computed by the steps), the other ``kwargs`` go to the Hugging Face
        model, with ``use_cache=False`` unless given.
        """
        if isinstance(input_ids, Mapping):
            kwargs = {**input_ids, **kwargs}
            input_ids = kwargs.pop("input_ids")
            attention_mask = kwargs.pop("attention_mask", attention_mask)
        kwargs.pop("labels", None)
        kwargs.setdefault("use_cache", False)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean next-token cross entropy of a batch, and the number of scored tokens."""
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"a dict batch must have an 'input_ids' key, got keys {sorted(batch)}")
            input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
            labels = batch.get("labels")
            if labels is None:
                labels = (
                    input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
                )
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[:, t + 1]
        elif isinstance(batch, tuple | list) and len(batch) == 2:
            (input_ids, targets), attention_mask = batch, None
        else:
            raise ValueError(
                "batch must be an (input_ids, targets) pair or a dict with 'input_ids' (and optional 'labels', "
                f"'attention_mask'), got {type(batch).__name__}"
            )
        logits = self(input_ids, attention_mask=attention_mask)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, (targets != IGNORE_INDEX).sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, ppl: MeanPerplexity) -> None:
        loss, tokens = self._loss(batch)
        ppl.update(loss, weight=tokens.to(loss.dtype))
        self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=int(tokens))  # token-weighted epoch mean
        self.log(f"{stage}_ppl", ppl, prog_bar=stage == "val")

    def on_validation_epoch_start(self) -> None:
        # A metric reset under inference mode (``trainer.validate``) holds inference tensors that the no-grad
        # validation of a later ``fit`` cannot update in place: start each epoch from fresh states.
        self.val_ppl.reset()

    def on_test_epoch_start(self) -> None:
        self.test_ppl.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, partial(_linear_warmup, warmup_steps=hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
