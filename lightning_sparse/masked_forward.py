r"""``MaskedForward``: modules compute with an effective weight (e.g. :math:`w \odot m`) while their parameters,
their names and the optimizer's parameter objects stay exactly as they are.

A forward pre-hook computes the effective tensor and puts it in the owning module's instance ``__dict__``.
Python finds instance attributes before ``nn.Module.__getattr__`` looks in ``_parameters``, so
``F.linear(x, self.weight)`` reads the effective tensor while ``_parameters["weight"]``, ``state_dict()``,
``named_parameters()`` and the optimizer see the plain parameter. A forward hook (run even when the forward raises)
removes the entry again. The effective tensor is rebuilt on every call, so every forward has its own graph:
gradient accumulation and activation checkpointing (``torch.utils.checkpoint``, which re-runs the hooks) work.

Hook placement: every module that owns the parameter (Linear, Conv1d/2d/3d, any module whose ``forward`` reads the
attribute; more than one for a tied weight), plus, for ``nn.MultiheadAttention.out_proj``, the attention module
itself: its ``forward`` reads ``self.out_proj.weight`` directly and never calls ``out_proj``'s own ``forward``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> masked = MaskedForward(layer, {"weight": lambda w: w * 0})
    >>> bool(layer(torch.ones(1, 4)).eq(layer.bias).all()), sorted(layer.state_dict())
    (True, ['bias', 'weight'])
    >>> masked.remove()
    >>> bool(layer(torch.ones(1, 4)).eq(layer.bias).all())
    False
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sparse.layers import parameter_aliases

WeightFn = Callable[[nn.Parameter], Tensor]


class _Installer:
    """Pre-hook that installs effective tensors into (sub)modules' ``__dict__``; post-hook that removes them.

    Entries name the owner by its path relative to the hooked module, so a ``copy.deepcopy`` of the model (which
    copies its hooks) installs into the copy's modules.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, WeightFn]] = []
        self._installed: list[list[tuple[nn.Module, str]]] = []

    def pre(self, module: nn.Module, args: Any) -> None:
        done: list[tuple[nn.Module, str]] = []
        self._installed.append(done)
        for path, name, fn in self.entries:
            owner = module.get_submodule(path)
            if name not in owner.__dict__:  # else an enclosing module's hook installed it already
                owner.__dict__[name] = fn(owner._parameters[name])
                done.append((owner, name))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._installed:
            for owner, name in self._installed.pop():
                owner.__dict__.pop(name, None)


def _hook_sites(model: nn.Module, owner_path: str) -> list[tuple[str, str]]:
    """``(hooked module path, owner path relative to it)`` for a parameter owned by ``owner_path``."""
    sites = [(owner_path, "")]
    parent_path, _, child = owner_path.rpartition(".")
    if child == "out_proj" and isinstance(model.get_submodule(parent_path), nn.MultiheadAttention):
        sites.append((parent_path, child))
    return sites


class MaskedForward:
    """Make the forward of ``model`` use ``fn(param)`` in place of each named parameter.

    Args:
        model: the root module; parameter names are relative to it.
        fns: parameter name (FQN, e.g. ``"encoder.0.attn.in_proj_weight"``) -> function of the parameter that
            returns the tensor the forward should use (same shape; differentiable where gradients should flow).

    Raises:
        ValueError: when a name is not a parameter of ``model``.
    """

    def __init__(self, model: nn.Module, fns: Mapping[str, WeightFn]) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(fns) - set(params))
        if unknown:
            raise ValueError(f"MaskedForward: {unknown} are not parameters of the model")
        self.model = model
        installers: dict[str, _Installer] = {}
        aliases = parameter_aliases(model)
        for fqn, fn in fns.items():
            for alias in aliases[fqn]:  # a tied weight: every module that reads it
                owner_path, _, name = alias.rpartition(".")
                for site, relative in _hook_sites(model, owner_path):
                    installers.setdefault(site, _Installer()).entries.append((relative, name, fn))
        self._handles: list[RemovableHandle] = []
        for site, installer in installers.items():
            module = model.get_submodule(site)
            self._handles.append(module.register_forward_pre_hook(installer.pre, prepend=True))
            self._handles.append(module.register_forward_hook(installer.post, always_call=True))

    def remove(self) -> None:
        """Remove the hooks: the model computes with its plain parameters again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self.model.modules():
            for name in list(module._parameters):
                module.__dict__.pop(name, None)
