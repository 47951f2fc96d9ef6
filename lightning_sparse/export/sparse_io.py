"""``export_sparse`` writes a dense-with-zeros model as safetensors files; ``load_sparse`` reads them back.

The export takes the model's weights with zeros and nothing else: it never knows which algorithm pruned them.
The directory layout is described in :mod:`lightning_sparse.export.manifest`; a Hugging Face model also gets a
``save_pretrained`` folder (:mod:`lightning_sparse.export.hf`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from torch import Tensor, nn

from lightning_sparse.export.hf import HFTarget, export_hf, find_hf_model
from lightning_sparse.export.manifest import COMPONENTS, MANIFEST_FILE, MODEL_FILE, SPARSE_FILE, Manifest
from lightning_sparse.export.plan import LayerPlan, parse_export_pattern, plan_layers
from lightning_sparse.export.tensors import save_state
from lightning_sparse.export.verify import ModelInput, check_example_input, tolerances, verify_outputs
from lightning_sparse.formats.bsr import BSRWeight, check_bsr, dense_to_bsr
from lightning_sparse.formats.semi_structured import dense_to_sparse24
from lightning_sparse.layers import layer_kind
from lightning_sparse.nn.eligible import linear_kind
from lightning_sparse.nn.sparse_conv import SparseConv2d
from lightning_sparse.nn.sparse_linear import SparseLinear

__all__ = ["export_sparse", "load_sparse"]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _components(plan: LayerPlan, fmt: str, blocksize: tuple[int, int] | None) -> dict[str, Tensor]:
    matrix = plan.matrix()  # (out, in): a Conv1D's transpose, a Conv2d's (out, in * kh * kw)
    parts = dense_to_bsr(matrix, blocksize)[:3] if fmt == "bsr" else dense_to_sparse24(matrix)[:2]
    param = plan.entry()["param"]
    return {f"{param}.{name}": t for name, t in zip(COMPONENTS[fmt], parts, strict=True)}


def _hf_target(model: nn.Module, hf: bool | None) -> HFTarget | str | None:
    if hf is not None and not isinstance(hf, bool):
        raise TypeError(f"hf must be True, False or None, got {hf!r}")
    target = None if hf is False else find_hf_model(model)
    if hf and not isinstance(target, HFTarget):
        raise ValueError(f"hf=True but {target or 'the model holds no transformers.PreTrainedModel'}")
    return target


def _dtype_name(model: nn.Module, plans: list[LayerPlan]) -> str:
    weights = [p.module.weight for p in plans if p.convert] or [p for p in model.parameters() if p.is_floating_point()]
    return str(weights[0].dtype).removeprefix("torch.") if weights else "float32"


def export_sparse(
    model: nn.Module,
    path: str | Path,
    *,
    pattern: str = "32x32",
    layer_patterns: Mapping[str, str] | None = None,
    include: Sequence[str] | str | None = None,
    example_input: ModelInput | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    hf: bool | None = None,
) -> Manifest:
    """Writes ``model`` (dense weights with zeros) to the directory ``path`` and returns the :class:`Manifest`.

    Writes ``model.safetensors`` (the full ``state_dict``), ``sparse.safetensors`` (the converted weights keyed by
    parameter FQN, each as its ``(out, in)`` matrix view: a Hugging Face ``Conv1D``'s transpose, a Conv2d's
    ``(out, in * kh * kw)``) and, last, ``manifest.json``. Which layers convert is decided by
    :func:`~lightning_sparse.export.plan.plan_layers`; the manifest records the reason for every other layer.
    When ``model`` is or holds a ``transformers.PreTrainedModel`` (``HFCausalLM.model``), its ``save_pretrained``
    folder goes to ``path/hf/`` too (:mod:`~lightning_sparse.export.hf`; recorded in ``manifest.huggingface``).
    Every zero written is ``+0.0`` (``w * mask`` leaves ``-0.0``, which broke vLLM). With ``example_input``, the
    model with its layers read back from ``sparse.safetensors``, and the model with its Hugging Face part reloaded
    from ``hf/`` by ``from_pretrained`` (a second copy in memory), must each reproduce the dense model's outputs on
    that batch before the manifest is written. The model is not changed.

    Args:
        model: the dense-with-zeros model.
        path: output directory (created; files of a previous export are overwritten).
        pattern: ``"RxC"`` BSR blocks (``"32x32"``), ``"2:4"``, or ``"dense"`` (only ``model.safetensors``).
        layer_patterns: parameter FQN -> blocks that layer is stored in instead (``{"features.3.weight": "64x9"}``:
            the blocks it was trained in); the manifest records each converted layer's pattern.
        include: FQN globs of the layers to convert (module name or ``<name>.weight``); each matched layer must fit
            the pattern. ``None``: see :func:`~lightning_sparse.export.plan.plan_layers`.
        example_input: a real batch to verify the outputs on: a Tensor, a tuple of positional inputs, or a dict of
            keyword inputs (``model(**batch)``, e.g. ``{"input_ids": ...}``).
        rtol: relative tolerance of the check (default per dtype, see :data:`~.verify.DEFAULT_TOLERANCES`).
        atol: absolute tolerance of the check (default per dtype).
        hf: write the Hugging Face folder: ``None`` when the model holds a Hugging Face model (a warning, and
            ``manifest.huggingface["reason"]``, say why when it cannot be written), ``True`` always (an error when
            it cannot be), ``False`` never.

    Returns:
        The manifest that was written (``manifest.verification`` holds the check's numbers).

    Raises:
        TypeError: if ``model`` is not a Module, or ``include``, ``example_input`` or ``hf`` has the wrong type.
        ValueError: on a bad ``pattern`` or tolerance, an ``include`` glob matching no layer, an included layer
            that does not fit the pattern (or whose weight is tied to another module), a layer whose weight breaks
            the 2:4 pattern, outputs that differ, or ``hf=True`` for a model without a Hugging Face model.
        RuntimeError: with ``hf=True``, when ``save_pretrained`` fails.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = model[0].weight.data[:, 32:].zero_()
        >>> import tempfile; out = tempfile.mkdtemp()
        >>> manifest = export_sparse(model, out, pattern="32x32", example_input=torch.randn(8, 64))
        >>> manifest.converted, manifest.skipped
        (['0'], {'2': 'shape (10, 64) is not divisible by the block 32x32'})
        >>> type(load_sparse(out, model)[0]).__name__
        'SparseLinear'
    """
    _check_model(model)
    tolerances(torch.float32, rtol, atol)
    if example_input is not None:
        check_example_input(example_input)
    target = _hf_target(model, hf)
    plans = plan_layers(model, pattern, include, layer_patterns)
    failed = next((p for p in plans if p.error), None)
    if failed is not None:
        shape = tuple(failed.module.weight.shape)
        raise ValueError(f"cannot export layer {failed.name!r} (weight {shape}) as pattern {failed.pattern!r}: "
                         f"{failed.error}")
    fmt, blocksize = parse_export_pattern(pattern)
    dirpath = Path(path)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / MANIFEST_FILE).unlink(missing_ok=True)  # a failed export must not look finished
    save_state(model.state_dict(), dirpath / MODEL_FILE)
    tensors = {k: v for p in plans if p.convert for k, v in _components(p, *parse_export_pattern(p.pattern)).items()}
    save_state(tensors, dirpath / SPARSE_FILE, metadata={"format": fmt})
    manifest = Manifest(
        format=fmt,
        pattern=pattern,
        blocksize=blocksize,
        n_m=(2, 4) if fmt == "2:4" else None,
        dtype=_dtype_name(model, plans),
        layers={p.name: p.entry() for p in plans},
    )
    if example_input is not None:
        layers = sparse_layers(dirpath, manifest, model)
        manifest.verification = verify_outputs(model, layers, example_input, rtol, atol)
    if isinstance(target, HFTarget):
        manifest.huggingface = export_hf(model, target, dirpath, example_input, rtol, atol, required=bool(hf))
    elif target is not None:
        warnings.warn(target, UserWarning, stacklevel=2)
        manifest.huggingface = {"dir": None, "module": None, "class": None, "reason": target, "verification": None}
    manifest.write(dirpath)
    return manifest


def check_layers(manifest: Manifest, model: nn.Module) -> None:
    """Checks that ``model`` has every layer of ``manifest`` with the recorded weight shape.

    Raises:
        ValueError: naming the first missing layer or the first shape that differs.
    """
    for name, entry in manifest.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}, which the export's manifest lists") from None
        weight = module._parameters.get("weight")
        shape = None if weight is None else list(weight.shape)
        if shape != entry["shape"]:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has weight shape {shape} but the manifest records "
                f"{entry['shape']}: the export was made from another model"
            )
        if entry["converted"] and linear_kind(module) is None and not isinstance(module, nn.Conv2d):
            kind = type(module).__name__
            raise ValueError(
                f"layer {name!r} is converted in the export but is a {kind}, not Linear, Hugging Face Conv1D or Conv2d"
            )
        if entry["converted"] and isinstance(module, nn.Conv2d) and manifest.format != "bsr":
            raise ValueError(f"layer {name!r} is a Conv2d, which {manifest.format!r} exports never convert")


def _blocksize(manifest: Manifest, name: str) -> tuple[int, int] | None:
    """The blocks layer ``name`` is stored in: its own pattern's, else the export's."""
    own = manifest.layers[name].get("pattern")
    return parse_export_pattern(own)[1] if own else manifest.blocksize


def _empty_layer(manifest: Manifest, name: str, layer: nn.Module) -> SparseLinear | SparseConv2d:
    blocksize = _blocksize(manifest, name)
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d.empty_like(layer, blocksize)
    weight = layer.weight
    out_features, in_features = linear_kind(layer).matrix_shape(weight.shape)
    return SparseLinear(
        in_features,
        out_features,
        manifest.format,
        blocksize or 1,
        layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )


def _read_layer(reader, manifest: Manifest, name: str, layer: nn.Module) -> SparseLinear | SparseConv2d:
    param, weight = manifest.layers[name]["param"], layer.weight
    state, stored = {}, set(reader.keys())
    for component in COMPONENTS[manifest.format]:
        key = f"{param}.{component}"
        if key not in stored:
            raise ValueError(f"{SPARSE_FILE} has no tensor {key!r}, which layer {name!r} needs")
        tensor = reader.get_tensor(key).to(weight.device)
        state[component] = tensor.to(weight.dtype) if component == "values" else tensor
    if manifest.format == "bsr":
        shape = layer_kind(layer).matrix_shape(weight.shape)  # (out, in): a Conv1D's transpose, a Conv2d's view
        check_bsr(BSRWeight(state["crow_indices"], state["col_indices"], state["values"], shape))
    sparse = _empty_layer(manifest, name, layer)
    if layer.bias is not None:
        state["bias"] = layer.bias.detach().clone()
    sparse.load_state_dict(state)
    return sparse


def sparse_layers(path: str | Path, manifest: Manifest, model: nn.Module) -> dict[str, nn.Module]:
    """The converted layers of an export as :class:`SparseLinear` (from ``nn.Linear`` and Hugging Face ``Conv1D``) /
    :class:`SparseConv2d` (biases, device, dtype and the convolution's configuration from ``model``).

    Raises:
        ValueError: if ``sparse.safetensors`` lacks a tensor a layer needs or its BSR components disagree.
    """
    with safe_open(str(Path(path) / SPARSE_FILE), framework="pt") as reader:
        return {name: _read_layer(reader, manifest, name, model.get_submodule(name)) for name in manifest.converted}


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Loads an export into ``model``: its full ``state_dict`` (strict), then its converted layers.

    The converted layers become :class:`~lightning_sparse.nn.SparseLinear` (an ``nn.Linear`` or Hugging Face
    ``Conv1D``: the same function) / :class:`~lightning_sparse.nn.SparseConv2d` built from ``sparse.safetensors``
    without re-converting anything; ``model`` is changed in place.

    Args:
        path: an export directory written by :func:`export_sparse`.
        model: a model of the exported architecture (plain ``nn.Linear`` / HF ``Conv1D`` / ``nn.Conv2d`` layers).

    Returns:
        ``model`` (or the sparse module when ``model`` itself is the converted layer).

    Raises:
        TypeError: if ``model`` is not a Module.
        FileNotFoundError: if the manifest or a safetensors file is missing.
        ValueError: on a manifest from a newer format version, a model whose layers or shapes differ from the
            manifest, or an incomplete ``sparse.safetensors``.
        RuntimeError: if ``model.safetensors`` does not load strictly into ``model``.
    """
    _check_model(model)
    manifest = Manifest.read(path)
    check_layers(manifest, model)
    load_model(model, str(Path(path) / MODEL_FILE), strict=True)
    for name, layer in sparse_layers(path, manifest, model).items():
        if not name:
            return layer
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model
