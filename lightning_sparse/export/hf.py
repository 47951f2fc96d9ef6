"""The Hugging Face folder of an export: the wrapped ``PreTrainedModel``'s ``save_pretrained`` output.

When the exported model is, or holds (``HFCausalLM.model``), a ``transformers.PreTrainedModel``, the export also
writes ``<path>/hf/``: ``config.json`` and safetensors with the Hugging Face parameter names, in Hugging Face
orientation (GPT-2's ``Conv1D`` weights stay ``(in, out)``) and with tied weights left tied (``save_pretrained``
writes ``lm_head``/``wte`` once), every zero an exact ``+0.0``. It is the dense-with-zeros checkpoint that
``AutoModelForCausalLM.from_pretrained``, vLLM, TensorRT-LLM and llm-compressor's ``ConstantPruningModifier`` read.

The model is found without importing transformers: the outermost submodule with a ``save_pretrained`` method and a
``config`` whose class derives from ``transformers``' ``PreTrainedModel`` (so a PEFT wrapper, whose
``save_pretrained`` writes adapters only, is looked through).

Example::

    >>> from torch import nn
    >>> find_hf_model(nn.Linear(2, 2)) is None
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.export.tensors import positive_zeros
from lightning_sparse.export.verify import ModelInput, verify_outputs

__all__ = ["HF_DIR", "HFTarget", "export_hf", "find_hf_model"]

HF_DIR = "hf"
"""The Hugging Face folder's name inside an export directory."""


def _looks_like_hf(module: nn.Module) -> bool:
    return callable(getattr(module, "save_pretrained", None)) and getattr(module, "config", None) is not None


def _is_pretrained_model(module: nn.Module) -> bool:
    mro = type(module).__mro__
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in mro)


@dataclass
class HFTarget:
    """The Hugging Face model of an export: its module FQN in the exported model (``""``: the model itself)."""

    name: str
    module: nn.Module

    def record(self, **fields: Any) -> dict[str, Any]:
        """The manifest's ``huggingface`` entry."""
        return {"dir": None, "module": self.name, "class": type(self.module).__name__, "reason": None, **fields}


def find_hf_model(model: nn.Module) -> HFTarget | str | None:
    """The outermost ``PreTrainedModel`` in ``model``; a reason string when something looks like one (it has
    ``save_pretrained`` and ``config``) but is not a ``transformers.PreTrainedModel``; ``None`` otherwise.

    Several separate ``PreTrainedModel`` submodules: the first one, with a warning naming the others.
    """
    candidates = [(name, module) for name, module in model.named_modules() if _looks_like_hf(module)]
    found = [(name, module) for name, module in candidates if _is_pretrained_model(module)]
    outer = [(n, m) for n, m in found if not any(n != o and (o == "" or n.startswith(f"{o}.")) for o, _ in found)]
    if not outer:
        if not candidates:
            return None
        name, module = candidates[0]
        return (
            f"{type(module).__name__} at {name or '<root>'!r} has save_pretrained and config but is not a "
            "transformers.PreTrainedModel, so no Hugging Face folder is written"
        )
    if len(outer) > 1:
        warnings.warn(
            f"the model holds {len(outer)} separate Hugging Face models {[n for n, _ in outer]}: the export's "
            f"{HF_DIR}/ folder holds the first one only",
            UserWarning,
            stacklevel=3,
        )
    return HFTarget(*outer[0])


def _reload(folder: Path, like: nn.Module) -> nn.Module:
    """``from_pretrained`` of ``folder`` with ``like``'s class, on its device, in eval mode."""
    param = next(like.parameters(), None)
    loaded = type(like).from_pretrained(str(folder), local_files_only=True)
    return (loaded if param is None else loaded.to(param.device)).eval()


def export_hf(
    model: nn.Module,
    target: HFTarget,
    dirpath: Path,
    example_input: ModelInput | None,
    rtol: float | None,
    atol: float | None,
    required: bool,
) -> dict[str, Any]:
    """Writes ``target``'s ``save_pretrained`` folder to ``dirpath / HF_DIR`` (zeros as ``+0.0``) and, with
    ``example_input``, checks that the folder reloaded in place of ``target`` reproduces ``model``'s outputs.

    Returns:
        The manifest's ``huggingface`` entry: ``dir`` (relative to ``dirpath``; ``None`` when not written),
        ``module``, ``class``, ``reason`` (why it was not written) and ``verification``.

    Raises:
        RuntimeError: when the folder cannot be written and ``required``; otherwise a warning says why.
        ValueError: when the reloaded model's outputs differ from ``model``'s.
    """
    folder = dirpath / HF_DIR
    try:
        state = positive_zeros(target.module.state_dict())
        target.module.save_pretrained(str(folder), state_dict=state)
    except Exception as err:  # an unwritable folder must not lose the sparse export: say so, loudly
        reason = f"save_pretrained failed: {type(err).__name__}: {err}"
        if required:
            raise RuntimeError(f"cannot write the Hugging Face folder {str(folder)!r}: {reason}") from err
        warnings.warn(f"the export has no Hugging Face folder: {reason}", UserWarning, stacklevel=3)
        return target.record(reason=reason)
    verification = None
    if example_input is not None:
        with torch.no_grad():
            loaded = _reload(folder, target.module)
        subject = f"the Hugging Face folder {HF_DIR}/ reloaded with from_pretrained"
        verification = verify_outputs(model, {target.name: loaded}, example_input, rtol, atol, subject=subject)
        del loaded
    return target.record(dir=HF_DIR, verification=verification)
