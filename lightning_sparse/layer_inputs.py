r"""The inputs a weight multiplies, as ``(n, cols)`` matrices, captured with forward hooks.

Supported weights (``cols`` as in the weight's matrix view ``(out, -1)``):

* ``nn.Linear.weight``, Hugging Face ``Conv1D.weight`` and any 2-D weight of a class given to
  :func:`~lightning_sparse.layers.register_layer`: the layer input (its last dimension is the weight's ``in``);
* ``nn.Conv1d/2d.weight`` (``groups=1``, any padding mode): the unfolded input patches;
* ``nn.MultiheadAttention.in_proj_weight``: the attention input, for self-attention (query, key and value the same
  tensor); ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``: the query / key / value;
* ``nn.MultiheadAttention.out_proj.weight``: the attention output before ``out_proj``. MHA calls ``out_proj``
  through ``F.linear``, so no hook on ``out_proj`` fires: the attention is recomputed with ``out_proj`` set to the
  identity.

:func:`collect_hessians` turns them into :math:`H = 2 X^\top X / n` per weight (summed over DDP ranks), the
Hessians SparseGPT prunes against.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> seen = {}
    >>> with capture_inputs(model, ["2.weight"], lambda name, x: seen.update({name: x.shape})):
    ...     _ = model(torch.randn(5, 3))
    >>> seen
    {'2.weight': torch.Size([5, 4])}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sparse.layers import layer_kind, matrix_shapes

Sink = Callable[[str, Tensor], None]
Forward = Callable[[nn.Module, Any], None]
_MHA_INPUTS = {"in_proj_weight": "qkv", "q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}
SUPPORTED = ("weights of nn.Linear, HF Conv1D, registered 2-D layer kinds, nn.Conv1d/2d (groups=1) and "
             "nn.MultiheadAttention (projections and out_proj)")


def input_kinds(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``name -> (module name to hook, kind)`` for each target weight.

    Raises:
        ValueError: for a parameter that is not a supported weight (naming it and its module type).
    """
    modules = dict(model.named_modules())
    out_projs = {f"{prefix}.out_proj".lstrip("."): prefix for prefix, m in modules.items()
                 if isinstance(m, nn.MultiheadAttention)}
    kinds = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if owner in out_projs and attr == "weight":
            kinds[name] = (out_projs[owner], "attn_out")
        elif isinstance(module, nn.Linear) and attr == "weight" or _is_matrix_layer(module, attr):
            kinds[name] = (owner, "linear")
        elif isinstance(module, nn.Conv1d | nn.Conv2d) and attr == "weight" and module.groups == 1:
            kinds[name] = (owner, "conv")
        elif isinstance(module, nn.MultiheadAttention) and attr in _MHA_INPUTS:
            kinds[name] = (owner, _MHA_INPUTS[attr])
        else:
            raise ValueError(f"cannot capture the inputs of {name} ({type(module).__name__}); supported: {SUPPORTED}; "
                             f"exclude {name!r}")
    return kinds


def _is_matrix_layer(module: nn.Module | None, attr: str) -> bool:
    kind = None if module is None else layer_kind(module)
    builtin = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.MultiheadAttention)
    return kind is not None and not builtin and attr in kind.weights and getattr(module, attr).dim() == 2


def _conv_columns(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    if x.dim() == conv.weight.dim() - 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _mha_inputs(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[i] if i < len(args) else kwargs[key] for i, key in enumerate(("query", "key", "value"))]


@torch.no_grad()
def _attention_output(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor:
    """MHA's output before ``out_proj``: the forward again, with ``out_proj`` the identity (restored after)."""
    out = mha.out_proj
    saved = [p.detach().clone() for p in (out.weight, out.bias) if p is not None]
    try:
        out.weight.copy_(torch.eye(*out.weight.shape, dtype=out.weight.dtype, device=out.weight.device))
        if out.bias is not None:
            out.bias.zero_()
        return mha.forward(*args, **kwargs)[0]
    finally:
        for param, value in zip((p for p in (out.weight, out.bias) if p is not None), saved, strict=True):
            param.copy_(value)


def _matrix(module: nn.Module, kind: str, name: str, args: tuple, kwargs: dict) -> Tensor:
    if kind == "linear":
        x = args[0] if args else kwargs["input"]
    elif kind == "conv":
        return _conv_columns(module, args[0] if args else kwargs["input"])
    else:
        query, key, value = _mha_inputs(args, kwargs)
        x = {"query": query, "key": key, "value": value}.get(kind, query)
        if kind == "qkv" and not all(t is query or torch.equal(t, query) for t in (key, value)):
            raise ValueError(f"{name} is shared by query, key and value, which differ (cross-attention); only "
                             f"self-attention is supported: exclude {name!r}")
    return x.reshape(-1, x.shape[-1])


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict, entries: list, sink: Sink) -> None:
    for name, kind in entries:
        sink(name, _matrix(module, kind, name, args, kwargs).detach())


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, entries: list, sink: Sink) -> None:
    x = _attention_output(module, args, kwargs)
    for name, _ in entries:
        sink(name, x.reshape(-1, x.shape[-1]).detach())


@contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str], sink: Sink) -> Iterator[None]:
    """Within the block, every forward call that reaches a weight in ``names`` calls ``sink(name, inputs)``.

    Raises:
        ValueError: see :func:`input_kinds`; during the forward, for ``in_proj_weight`` under cross-attention.
    """
    modules = dict(model.named_modules())
    pre: dict[str, list] = {}
    post: dict[str, list] = {}
    for name, (owner, kind) in input_kinds(model, names).items():
        (post if kind == "attn_out" else pre).setdefault(owner, []).append((name, kind))
    handles = [modules[o].register_forward_pre_hook(partial(_pre_hook, entries=e, sink=sink), with_kwargs=True)
               for o, e in pre.items()]
    handles += [modules[o].register_forward_hook(partial(_post_hook, entries=e, sink=sink), with_kwargs=True)
                for o, e in post.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _HessianSums:
    """Running :math:`\\sum x x^\\top` (float64) and row counts of the inputs of some weights."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        cols = {name: shape[1] for name, shape in matrix_shapes(model, names).items()}
        self.sums = {n: torch.zeros(c, c, dtype=torch.float64, device=params[n].device) for n, c in cols.items()}
        self.counts = dict.fromkeys(names, 0)

    def __call__(self, name: str, x: Tensor) -> None:
        if x.shape[-1] != self.sums[name].shape[0]:
            raise ValueError(f"the input of {name} has {x.shape[-1]} features but its (out, in) view takes "
                             f"{self.sums[name].shape[0]}: its layer does not compute x @ weight.T")
        x = x.reshape(-1, self.sums[name].shape[0]).float()
        self.sums[name] += (x.T @ x).to(torch.float64)
        self.counts[name] += x.shape[0]

    def hessians(self) -> dict[str, Tensor]:
        result = {}
        for name, total in self.sums.items():
            count = torch.tensor(float(self.counts[name]), dtype=torch.float64, device=total.device)
            if _distributed():
                dist.all_reduce(total)
                dist.all_reduce(count)
            if count == 0:
                raise ValueError(f"no calibration batch reached {name}: its module was never called by the forward")
            result[name] = 2 * total / count
        return result


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str], batches: Sequence, forward: Forward) -> dict[str, Tensor]:
    """:math:`H = 2 X^\\top X / n` (float64) per weight in ``names``, from ``forward(model, batch)`` on every batch.

    Under ``torch.distributed``, the sums and row counts are all-reduced (in the order of ``names``, the same on every
    rank) so every rank gets the same Hessians.

    Raises:
        ValueError: see :func:`input_kinds`; when no batch reached a weight (naming it).
    """
    sums = _HessianSums(model, names)
    with capture_inputs(model, names, sums):
        for batch in batches:
            forward(model, batch)
    return sums.hessians()


@torch.no_grad()
def forward_order(model: nn.Module, names: Sequence[str], batch: Any, forward: Forward) -> list[str]:
    """``names`` in the order one forward of ``batch`` reaches them (weights it never reaches last)."""
    order: list[str] = []
    with capture_inputs(model, names, lambda name, x: order.append(name) if name not in order else None):
        forward(model, batch)
    return order + [name for name in names if name not in order]
