"""Lightning callbacks: every sparsity algorithm, the scheduler, monitoring, export and benchmarking."""

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.magnitude import MagnitudePruning
from lightning_sparse.callbacks.monitor import SparsityMonitor
from lightning_sparse.callbacks.scheduler import SparsityScheduler

__all__ = ["MagnitudePruning", "SparsityCallback", "SparsityMonitor", "SparsityScheduler"]
