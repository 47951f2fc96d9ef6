r"""The masked forward under FSDP2: effective weights written into the local shards, the chain rule on each shard.

Under FSDP2 (``fully_shard``) a module's forward sees the parameter FSDP2 all-gathers from every rank's shard in its
pre-forward, and its backward a gradient FSDP2 reduce-scatters back to the shards. :class:`ShardedForward` puts the
mask in front of the all-gather instead of behind it:

1. before the forward passes of an optimizer step (``on_train_batch_start``, and for validation), each rank writes
   its rows of the effective weight :math:`\tilde w = f(w)` (e.g. :math:`w \odot m`) into its shard, after copying
   the dense rows :math:`w` aside: FSDP2 all-gathers :math:`\tilde w` exactly as it would gather :math:`w`;
2. FSDP2 hands each shard :math:`\partial L / \partial \tilde w` (summed over the data-parallel ranks and
   microbatches); before the optimizer step the dense rows come back and the gradient becomes
   :math:`\partial L / \partial w` through the same autograd functions one process uses, on the local rows only
   (elementwise, so no communication; Spartan's threshold term adds two all-reduced numbers per budget).

Why here and not on the gathered weight: every masked function is elementwise in the rows (blocks and N:M groups lie
inside a shard's rows, checked at fit start), so the rows of :math:`\tilde w` computed from local rows are the rows
one process computes from the whole weight: bit for bit for a select or a multiply (TopKAST, Supermask, Spartan's
frozen mask), to 1 ulp through Spartan's sigmoid (the CPU's vector loop and its scalar tail round it differently, and
a shard's tail is not the whole weight's). Nothing whole is built or kept on any rank: no gathered mask,
no second full-size weight saved for the backward (masking the gathered weight would keep :math:`\tilde w` alive for
the backward in every layer: a whole unsharded copy of the model per rank), and no traffic is added to the forward or
the backward. What it adds per rank: one copy of the local rows of the targets (the dense weights while the shards
hold :math:`\tilde w`), the local masks, and two local-row copies per optimizer step.

While the shards hold :math:`\tilde w` (from ``on_train_batch_start`` to the optimizer step, and during a validation,
test or predict loop) code that reads a target's local shard reads :math:`\tilde w`; checkpoints Lightning saves
(``ModelCheckpoint``, ``trainer.save_checkpoint`` between steps) see the dense weights. An exception in between puts
the dense rows back (``on_exception``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lightning_sparse.distributed import local

EffectiveFn = Callable[[str, Tensor], Tensor]
GradientsFn = Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]]


class ShardedForward:
    """Swap the targets' local shards between their dense and effective rows (see the module docstring).

    Args:
        params: target name -> FSDP2 parameter (a ``DTensor`` sharded on dim 0).
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self.dense: dict[str, Tensor] = {}
        self.active = False

    def rows(self, name: str) -> Tensor:
        """The dense local rows of ``name`` (aside while the shard holds the effective rows)."""
        return self.dense[name] if self.active else local(self.params[name].data)

    @torch.no_grad()
    def swap_in(self, effective: EffectiveFn) -> None:
        """Write ``effective(name, dense rows)`` into every shard, keeping the dense rows aside (once per step)."""
        if self.active:
            return
        for name, param in self.params.items():
            shard = local(param.data)
            aside = self.dense.get(name)
            if aside is None or aside.shape != shard.shape:
                aside = self.dense[name] = torch.empty_like(shard)
            aside.copy_(shard)
            shard.copy_(effective(name, aside))
        self.active = True

    @torch.no_grad()
    def swap_out(self, gradients: GradientsFn | None = None) -> None:
        """Put the dense rows back; with ``gradients``, first replace each shard's dL/d(effective) by what
        ``gradients(dense rows, dL/d(effective) rows)`` returns (dL/d(dense))."""
        if not self.active:
            return
        if gradients is not None:
            grads = {name: local(p.grad) for name, p in self.params.items() if p.grad is not None}
            new = gradients({name: self.dense[name] for name in grads}, grads)
            for name, grad in new.items():
                grads[name].copy_(grad)
        for name, param in self.params.items():
            local(param.data).copy_(self.dense[name])
        self.active = False


def autograd_gradients(effective: EffectiveFn, dense: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """dL/d(dense rows) from dL/d(effective rows) through ``effective`` (autograd on the local rows)."""
    out = {}
    with torch.enable_grad():
        for name, rows in dense.items():
            leaf = rows.detach().requires_grad_()
            (out[name],) = torch.autograd.grad(effective(name, leaf), leaf, grads[name])
    return out


def set_local_grad(param: nn.Parameter, rows: Tensor) -> None:
    """Make ``rows`` this rank's shard of ``param``'s gradient (a ``DTensor`` laid out like ``param``)."""
    from torch.distributed.tensor import DTensor

    if param.grad is not None:
        local(param.grad).copy_(rows)
        return
    param.grad = DTensor.from_local(rows.to(param.dtype), param.device_mesh, param.placements, run_check=False,
                                    shape=param.shape, stride=param.stride())
