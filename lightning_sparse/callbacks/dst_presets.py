"""Presets of :class:`~lightning_sparse.callbacks.DynamicSparseTraining`: SET, RigL, SNFS and MEST.

Each is the general callback with its criteria fixed; every other argument keeps its meaning. Names in
``fastsparse`` map as ``keep_score_f`` -> ``drop``, ``grow_score_f`` -> ``grow``, ``initial_drop_grow_pct`` ->
``drop_fraction``, ``stop_pct`` -> ``stop_at``, ``batches_per_update`` -> ``update_every`` (optimizer steps here),
``redistribute_f`` -> ``redistribution``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_sparse.callbacks.dst import DynamicSparseTraining


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training (Mocanu et al. 2018): magnitude drop, random growth.

    https://arxiv.org/abs/1707.04780; ``drop_fraction=0.3`` (cosine to zero), ``stop_at=1.0``.

    ``fastsparse``: ``SET_presets = {'keep_score_f': weight_magnitude, 'grow_score_f': random_score,
    'initial_drop_grow_pct': 0.3, 'stop_pct': 1.0}``. The paper keeps the fraction constant: add
    ``SparsityScheduler(density=..., initial_density=..., drop_fraction=0.3)``. For the paper's sign-split drop use
    ``DynamicSparseTraining(drop="set", grow="random", stop_at=1.0)``.

    Args:
        density: fraction of weights kept, in (0, 1].
        pattern: ``"unstructured"`` or ``"RxC"`` blocks.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"``.
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between updates (``None``: static).
        drop_fraction: initial fraction of active weights rewired per update, in [0, 1).
        stop_at: fraction of the run after which masks stay fixed, in (0, 1].
        init: ``"random"`` or ``"magnitude"`` initial masks.
        seed: seed of the callback's generator.
        scale_init: scale each unit's initial weights to its active fan-in (see ``DynamicSparseTraining``).
        optimizer_state: ``"zero"`` (the paper) or ``"keep"``: the optimizer state regrown weights start from (see
            ``DynamicSparseTraining``).

    Raises:
        ValueError: see :class:`~lightning_sparse.callbacks.DynamicSparseTraining`.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import SET

        trainer = Trainer(max_epochs=4, callbacks=[SET(density=0.1, update_every=100)])
    """

    def __init__(
        self,
        density: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "erk",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int | None = 100,
        drop_fraction: float = 0.3,
        stop_at: float = 1.0,
        init: str = "random",
        seed: int = 0,
        scale_init: bool = False,
        optimizer_state: str = "zero",
    ) -> None:
        super().__init__("magnitude", "random", density, pattern, distribution, include, exclude, skip_first,
                         skip_last, update_every, drop_fraction, stop_at, init, seed=seed, scale_init=scale_init,
                         optimizer_state=optimizer_state)


class RigL(DynamicSparseTraining):
    """Rigging the Lottery (Evci et al. 2020): magnitude drop, growth by the dense gradient's magnitude.

    https://arxiv.org/abs/1911.11134; every 100 steps, ``drop_fraction=0.3`` cosine to zero at ``stop_at=0.75``, ERK
    densities.

    ``fastsparse``: ``RigL_presets = {'keep_score_f': weight_magnitude, 'grow_score_f': gradient_magnitude,
    'initial_drop_grow_pct': 0.3, 'stop_pct': 0.75, 'batches_per_update': 100}`` (``batches_per_update`` on HEAD
    only). Unlike the reference code, the optimizer still steps on update steps.

    Args:
        density: fraction of weights kept, in (0, 1].
        pattern: ``"unstructured"`` or ``"RxC"`` blocks.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"``.
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between updates (``None``: static).
        drop_fraction: initial fraction of active weights rewired per update, in [0, 1).
        stop_at: fraction of the run after which masks stay fixed, in (0, 1].
        init: ``"random"`` or ``"magnitude"`` initial masks.
        seed: seed of the callback's generator.
        scale_init: scale each unit's initial weights to its active fan-in (see ``DynamicSparseTraining``).
        optimizer_state: ``"zero"`` (the paper) or ``"keep"``: the optimizer state regrown weights start from (see
            ``DynamicSparseTraining``).

    Raises:
        ValueError: see :class:`~lightning_sparse.callbacks.DynamicSparseTraining`.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import RigL

        trainer = Trainer(max_epochs=4, callbacks=[RigL(density=0.1)])
    """

    def __init__(
        self,
        density: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "erk",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int | None = 100,
        drop_fraction: float = 0.3,
        stop_at: float = 0.75,
        init: str = "random",
        seed: int = 0,
        scale_init: bool = False,
        optimizer_state: str = "zero",
    ) -> None:
        super().__init__("magnitude", "gradient", density, pattern, distribution, include, exclude, skip_first,
                         skip_last, update_every, drop_fraction, stop_at, init, seed=seed, scale_init=scale_init,
                         optimizer_state=optimizer_state)


class SNFS(DynamicSparseTraining):
    """Sparse Networks From Scratch (Dettmers & Zettlemoyer 2019): magnitude drop, growth by momentum magnitude.

    https://arxiv.org/abs/1907.04840; momentum redistribution across layers, ``drop_fraction=0.5``, ``stop_at=1.0``.

    ``fastsparse``: ``SNFS_presets = {'keep_score_f': weight_magnitude, 'grow_score_f': gradient_momentum,
    'redistribute_f': momentum_redistribution, 'initial_drop_grow_pct': 0.5, 'stop_pct': 1.0}`` (HEAD; 0.0.5 has
    no ``redistribute_f`` and 0.3). Momentum here is an average of the dense gradients kept by the callback (see
    :mod:`lightning_sparse.callbacks.dst`) and is ranked by magnitude (``fastsparse`` ranks the signed value).

    Args:
        density: fraction of weights kept, in (0, 1].
        pattern: ``"unstructured"`` or ``"RxC"`` blocks.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"`` (the initial allocation).
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between updates (``None``: static).
        drop_fraction: initial fraction of active weights rewired per update, in [0, 1).
        stop_at: fraction of the run after which masks stay fixed, in (0, 1].
        init: ``"random"`` or ``"magnitude"`` initial masks.
        seed: seed of the callback's generator.
        scale_init: scale each unit's initial weights to its active fan-in (see ``DynamicSparseTraining``).
        optimizer_state: ``"zero"`` (the paper) or ``"keep"``: the optimizer state regrown weights start from (see
            ``DynamicSparseTraining``).

    Raises:
        ValueError: see :class:`~lightning_sparse.callbacks.DynamicSparseTraining`.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import SNFS

        trainer = Trainer(max_epochs=4, callbacks=[SNFS(density=0.1, update_every=200)])
    """

    def __init__(
        self,
        density: float | None = None,
        pattern: str = "unstructured",
        distribution: str = "erk",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int | None = 100,
        drop_fraction: float = 0.5,
        stop_at: float = 1.0,
        init: str = "random",
        seed: int = 0,
        scale_init: bool = False,
        optimizer_state: str = "zero",
    ) -> None:
        super().__init__("magnitude", "momentum", density, pattern, distribution, include, exclude, skip_first,
                         skip_last, update_every, drop_fraction, stop_at, init, redistribution="momentum", seed=seed,
                         scale_init=scale_init,
                         optimizer_state=optimizer_state)


class MEST(DynamicSparseTraining):
    """Memory-Economic Sparse Training (Yuan et al. 2021): drop by |w| + gamma |g|, grow by gradient magnitude.

    https://arxiv.org/abs/2110.14032: drop by :math:`|w| + \\gamma |g|` (``gamma=1.0``), grow by gradient magnitude
    (or ``grow="random"``).

    No ``fastsparse`` preset; Fantastic Weights (https://arxiv.org/abs/2306.12230) studies this drop score with
    both growths.

    Args:
        density: fraction of weights kept, in (0, 1].
        grow: ``"gradient"`` or ``"random"`` (or any grow criterion).
        gamma: weight of the gradient in the drop score, >= 0.
        pattern: ``"unstructured"`` or ``"RxC"`` blocks.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or ``"global"``.
        include: glob patterns of parameter names to sparsify.
        exclude: glob patterns of parameter names to keep dense.
        skip_first: keep the first target dense.
        skip_last: keep the last target dense.
        update_every: optimizer steps between updates (``None``: static).
        drop_fraction: initial fraction of active weights rewired per update, in [0, 1).
        stop_at: fraction of the run after which masks stay fixed, in (0, 1].
        init: ``"random"`` or ``"magnitude"`` initial masks.
        seed: seed of the callback's generator.
        scale_init: scale each unit's initial weights to its active fan-in (see ``DynamicSparseTraining``).
        optimizer_state: ``"zero"`` (the paper) or ``"keep"``: the optimizer state regrown weights start from (see
            ``DynamicSparseTraining``).

    Raises:
        ValueError: see :class:`~lightning_sparse.callbacks.DynamicSparseTraining`.

    Example::

        from lightning.pytorch import Trainer
        from lightning_sparse.callbacks import MEST

        trainer = Trainer(max_epochs=4, callbacks=[MEST(density=0.1, gamma=1.0)])
    """

    def __init__(
        self,
        density: float | None = None,
        grow: str = "gradient",
        gamma: float = 1.0,
        pattern: str = "unstructured",
        distribution: str = "erk",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        skip_first: bool = False,
        skip_last: bool = False,
        update_every: int | None = 100,
        drop_fraction: float = 0.3,
        stop_at: float = 0.75,
        init: str = "random",
        seed: int = 0,
        scale_init: bool = False,
        optimizer_state: str = "zero",
    ) -> None:
        super().__init__("mest", grow, density, pattern, distribution, include, exclude, skip_first, skip_last,
                         update_every, drop_fraction, stop_at, init, gamma=gamma, seed=seed, scale_init=scale_init,
                         optimizer_state=optimizer_state)
