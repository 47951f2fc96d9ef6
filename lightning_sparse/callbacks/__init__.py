"""Lightning callbacks: every sparsity algorithm, the scheduler, monitoring, export and benchmarking."""

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.callbacks.benchmark import KernelBenchmark
from lightning_sparse.callbacks.dst import DynamicSparseTraining
from lightning_sparse.callbacks.dst_presets import MEST, SET, SNFS, RigL
from lightning_sparse.callbacks.export import SparseExport
from lightning_sparse.callbacks.magnitude import MagnitudePruning
from lightning_sparse.callbacks.masked import MaskedForwardCallback
from lightning_sparse.callbacks.monitor import SparsityMonitor
from lightning_sparse.callbacks.nm import NMSparsity
from lightning_sparse.callbacks.scheduler import SparsityScheduler
from lightning_sparse.callbacks.sparsegpt import SparseGPT
from lightning_sparse.callbacks.spartan import Spartan
from lightning_sparse.callbacks.supermask import Supermask
from lightning_sparse.callbacks.topkast import TopKAST
from lightning_sparse.core.criteria import register_criterion

__all__ = [
    "DynamicSparseTraining",
    "KernelBenchmark",
    "MEST",
    "MagnitudePruning",
    "MaskedForwardCallback",
    "NMSparsity",
    "RigL",
    "SET",
    "SNFS",
    "SparseExport",
    "SparseGPT",
    "SparsityCallback",
    "SparsityMonitor",
    "SparsityScheduler",
    "Spartan",
    "Supermask",
    "TopKAST",
    "register_criterion",
]
