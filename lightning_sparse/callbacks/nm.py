"""``NMSparsity``: N:M masks during training (e.g. 2:4 for NVIDIA sparse tensor cores).

NVIDIA ASP's recipe (Mishra et al. 2021, https://arxiv.org/abs/2104.08378): train dense, select the ``n``
largest-magnitude weights of every ``m`` consecutive inputs once, then fine-tune with the mask fixed. With
``reselect_every`` the selection is repeated every that many optimizer steps instead (the mask may change).
Groups run along the input dimension of each weight's matrix view (a Conv weight ``(out, in, kh, kw)`` is viewed as
``(out, in * kh * kw)``); ``m`` must divide it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_sparse.callbacks._args import check_int
from lightning_sparse.callbacks.magnitude import MagnitudePruning


class NMSparsity(MagnitudePruning):
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive inputs.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size along the input dimension.
        at_step: optimizer step of the (first) selection; 0 selects before training.
        reselect_every: re-select every this many steps after ``at_step``; ``None`` fixes the mask (ASP).
        include: glob patterns of parameter names (default: Linear, Conv and attention weights).
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        seed: seed of the callback's generator.

    Raises:
        ValueError: when ``n >= m``, ``n < 1``, ``at_step < 0`` or ``reselect_every < 1``; in ``setup``, when ``m``
            does not divide a target's input dimension (the layer and shape are named).
        TypeError: when ``n`` or ``m`` is not an int.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import NMSparsity

        # dense for 1000 steps, then 2:4 fixed for the rest of the run
        trainer = Trainer(max_steps=3000, callbacks=[NMSparsity(n=2, m=4, at_step=1000, exclude=["head.weight"])])
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        at_step: int = 0,
        reselect_every: int | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        seed: int = 0,
    ) -> None:
        check_int("n", n, 1)
        check_int("m", m, 2)
        if n >= m:
            raise ValueError(f"n must be smaller than m (keep n of every m), got n={n}, m={m}")
        self.reselect_every = None if reselect_every is None else check_int("reselect_every", reselect_every, 1)
        super().__init__(
            density=n / m, pattern=f"{n}:{m}", include=include, exclude=exclude, skip_first=skip_first,
            skip_last=skip_last, update_every=reselect_every or 1, at_step=at_step, seed=seed,
        )
        self.n, self.m = n, m


    @property
    def pattern_argument(self) -> str:
        return f"n={self.n}, m={self.m}"
    def should_update(self, step: int) -> bool:
        if self.reselect_every is None:
            return step == self.at_step
        return step >= self.at_step and (step - self.at_step) % self.reselect_every == 0
